"""The run record: typed, versioned, and a checkpoint of release 0.1.0 still resumes."""

import shutil
import sys
from pathlib import Path

import numpy as np
import optax
import pytest

from kithara_ops import ConfigError, Trainer
from kithara_ops.checkpoint.checkpointer import Checkpointer
from kithara_ops.checkpoint.record import RECORD_VERSION, RunRecord, migrate_v0, new_record

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))

from fixture_model import fixture_batches, fixture_model  # noqa: E402


def fixture_trainer(directory, steps, **options):
    return Trainer(
        fixture_model(),
        optax.adamw(1e-2),
        fixture_batches(),
        steps=steps,
        log_every=1,
        tracking=False,
        checkpoint_dir=str(directory) if directory else None,
        **options,
    )


def test_a_release_0_1_checkpoint_is_read_as_a_typed_record(tmp_path):
    directory = shutil.copytree(FIXTURES / "checkpoint_v0", tmp_path / "run")
    store = Checkpointer(directory)
    try:
        assert store.steps() == [3]
        record = store.read_record(3)
    finally:
        store.close()
    assert record.step == 3
    assert record.loss == pytest.approx(4.331568717956543)
    # Objects were marked "<label>" in 0.1.0; now they are labels the record names in ``given``.
    assert record.config["model"] == "causal_lm" and record.config["data"] == "list"
    assert record.given == ["data", "model", "optimizer"] and "given" not in record.config
    config = record.run_config()
    assert config.model == "causal_lm" and config.steps == 3 and config.batch_size == 8
    assert record.optimizer["name"] == "adamw" and record.optimizer["learning_rate"] == 0.01
    assert len(record.keys["params"]) == 12
    assert record.data_position is None and record.mlflow_run_id is None
    assert record.versions["kithara-ops"] == "0.1.0"
    # No identity was recorded then; the one derived from the record is stable.
    assert record.run_uid == RunRecord.from_json(record_v0(directory)).run_uid


def record_v0(directory):
    import json

    return json.loads((Path(directory) / "3" / "meta" / "metadata").read_text())


def test_a_release_0_1_checkpoint_resumes_like_a_straight_run(tmp_path):
    directory = shutil.copytree(FIXTURES / "checkpoint_v0", tmp_path / "run")
    resumed = fixture_trainer(directory, steps=6, devices=_one_device())
    result = resumed.train(resume=True)
    assert result.step == 6
    straight = fixture_trainer(None, steps=6, devices=_one_device())
    expected = straight.train()
    # Both ran on one device, as the fixture was written, with the same arithmetic; the
    # fixture's first 3 steps ran on another machine, whose processor may round the last bit
    # of a float32 otherwise (seen: 1e-7), so the comparison allows that and no more.
    assert result.loss == pytest.approx(expected.loss, rel=1e-6)
    for resumed_value, straight_value in zip(
        resumed.state.params.values(), straight.state.params.values(), strict=True
    ):
        np.testing.assert_allclose(
            np.asarray(resumed_value), np.asarray(straight_value), rtol=1e-5, atol=1e-6
        )
    store = Checkpointer(directory)
    try:
        assert store.steps() == [3, 6]
        assert store.read_record(6).to_json()["version"] == RECORD_VERSION
    finally:
        store.close()


def _one_device():
    import jax

    return jax.devices()[:1]


def test_records_round_trip_and_refuse_a_newer_version():
    from kithara_ops import RunConfig

    record = new_record(
        7,
        run_uid="abc",
        config=RunConfig(steps=9, coordinator="127.0.0.1:1", num_processes=2, process_id=0),
        optimizer={"name": "adamw"},
        keys={"params": ["a"]},
        data_position={"next_batch": 7},
        loss=1.5,
        given={"optimizer"},
    )
    values = record.to_json()
    assert values["version"] == RECORD_VERSION
    assert values["config"]["coordinator"] is None  # launch fields are not part of the run
    assert values["given"] == ["optimizer"] and "given" not in values["config"]
    assert RunRecord.from_json(values) == record
    with pytest.raises(ConfigError, match=r"version 99.*upgrade"):
        RunRecord.from_json({**values, "version": 99})
    # Versions 1 and 2 kept ``given`` in the config: it moves to the record.
    older = {**values, "version": 2, "given": None}
    older["config"] = {**values["config"], "given": ["optimizer"]}
    del older["given"]
    assert RunRecord.from_json(older) == record


def test_migrate_v0_keeps_the_mlflow_run_and_fills_tracking_settings():
    meta = {
        "step": 4,
        "data": {"consumed": 4, "epoch": 0, "iterator": {"next_batch": 4}},
        "loss": 2.0,
        "config": {"model": "tiny", "optimizer": "<optax:sgd lr=0.1>", "tracking_uri": None},
        "mlflow": {"run_id": "r1", "tracking_uri": "http://127.0.0.1:5000", "experiment": "e"},
        "keys": {"params": ["k"]},
    }
    values = migrate_v0(meta)
    assert values["mlflow_run_id"] == "r1" and values["run_uid"] == "r1"
    assert values["config"]["optimizer"] == "optax:sgd lr=0.1"
    assert values["config"]["given"] == ["optimizer"] and values["config"]["model"] == "tiny"
    assert values["config"]["tracking_uri"] == "http://127.0.0.1:5000"
    assert values["config"]["experiment"] == "e"
    assert values["data_position"] == {"next_batch": 4}
