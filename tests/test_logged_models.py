"""Checkpoints recorded as MLflow logged models; the training data as the run's input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import BATCH, SEQ_LEN
from mlflow import MlflowClient

from kithara_ops import RunConfig, data
from kithara_ops.build import build_trainer
from kithara_ops.tracking.logged_models import CHECKPOINT_MODEL_TYPE, PATH_TAG, STEP_TAG


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A 6-step run saved (and evaluated) every 2 steps, tracked in a SQLite store."""
    root = tmp_path_factory.mktemp("logged")
    uri = f"sqlite:///{root}/mlflow.db"
    config = RunConfig(
        model="tiny", data="synthetic", eval_data="synthetic", seq_len=SEQ_LEN,
        batch_size=BATCH, steps=6, save_every=2, eval_every=2, eval_steps=2, log_every=2, keep=10,
        checkpoint_dir=str(root / "ckpt"), tracking_uri=uri, experiment="logged",
        system_metrics=False, optimizer="optax.adam(3e-3)",
    )  # fmt: skip
    result = build_trainer(config).train()
    client = MlflowClient(uri)
    return client, client.get_experiment_by_name("logged").experiment_id, result.run_id, config


@pytest.mark.slow
def test_each_checkpoint_is_a_logged_model_with_the_metrics_of_its_step(tracked_run):
    client, experiment, run_id, _ = tracked_run
    found = client.search_logged_models(
        [experiment], filter_string=f"model_type = '{CHECKPOINT_MODEL_TYPE}'"
    )
    by_step = {int(m.tags[STEP_TAG]): m for m in found}
    assert sorted(by_step) == [2, 4, 6]
    history = {m.step: m.value for m in client.get_metric_history(run_id, "eval_loss")}
    for step, model in by_step.items():
        assert model.name == f"step-{step}" and model.source_run_id == run_id
        assert model.status.to_proto() == model.status.READY.to_proto()
        assert Path(model.tags[PATH_TAG]).is_dir() and Path(model.tags[PATH_TAG]).name == str(step)
        metrics = {m.key: m.value for m in model.metrics}
        assert metrics["eval_loss"] == pytest.approx(history[step]), step
        assert set(metrics) == {"loss", "eval_loss", "perplexity"}


@pytest.mark.slow
def test_the_best_checkpoint_is_one_search(tracked_run):
    client, experiment, run_id, _ = tracked_run
    best = client.search_logged_models(
        [experiment],
        order_by=[{"field_name": "metrics.eval_loss", "ascending": True}],
        max_results=1,
    )[0]
    history = {m.step: m.value for m in client.get_metric_history(run_id, "eval_loss")}
    lowest = min(history, key=history.get)
    assert int(best.tags[STEP_TAG]) == lowest


@pytest.mark.slow
def test_the_training_data_is_the_runs_input(tracked_run):
    client, _, run_id, _ = tracked_run
    inputs = client.get_run(run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    dataset = inputs[0].dataset
    expected = data.load("synthetic", seq_len=SEQ_LEN, batch_size=BATCH).summary()
    assert (dataset.name, dataset.digest) == ("synthetic", expected["digest"])
    profile = json.loads(dataset.profile)
    assert profile["tokens"] == expected["profile"]["tokens"] > 0
    assert [t.value for t in inputs[0].tags if t.key == "mlflow.data.context"] == ["training"]


def test_a_datasets_digest_follows_its_tokens():
    a = data.load("synthetic", seq_len=16, batch_size=2).summary()
    b = data.load("synthetic", seq_len=16, batch_size=4, seed=3).summary()
    c = data.load("synthetic", seq_len=32, batch_size=2).summary()
    assert a["digest"] == b["digest"] != c["digest"]  # batching and order are not the data
    assert a["profile"]["tokens"] == a["profile"]["sequences"] * 16
