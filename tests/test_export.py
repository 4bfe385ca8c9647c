"""``export``: a checkpoint's trained model, written where other tools load it."""

from __future__ import annotations

import contextlib

import keras
import numpy as np
import pytest
from conftest import BATCH, SEQ_LEN
from typer.testing import CliRunner

from kithara_ops import RunConfig
from kithara_ops.build import build_trainer
from kithara_ops.cli import app
from kithara_ops.errors import ConfigError
from kithara_ops.export import export


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run of the built-in model saved at steps 2 and 4, and its trained model."""
    directory = tmp_path_factory.mktemp("export") / "ckpt"
    config = RunConfig(
        model="tiny", data="synthetic", seq_len=SEQ_LEN, batch_size=BATCH, steps=4,
        save_every=2, checkpoint_dir=str(directory), tracking=False, system_metrics=False,
        optimizer="optax.adam(1e-2)",
    )  # fmt: skip
    trainer = build_trainer(config)
    model = trainer.model
    trainer.train()
    return directory, model


def logits(model, ids):
    return np.asarray(model(ids, training=False))


def test_a_keras_export_gives_the_trained_models_logits(trained, tmp_path):
    directory, model = trained
    written = export(directory, tmp_path / "out", format="keras")
    assert written == tmp_path / "out" / "model.keras" and written.stat().st_size > 0
    loaded = keras.saving.load_model(written)
    ids = np.arange(2 * SEQ_LEN, dtype=np.int32).reshape(2, SEQ_LEN) % 200
    np.testing.assert_allclose(logits(loaded, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


def test_an_earlier_step_exports_that_steps_weights(trained, tmp_path):
    directory, model = trained
    final = export(directory, tmp_path / "final", format="keras")
    early = export(directory, tmp_path / "early", format="keras", step=2)
    ids = np.arange(SEQ_LEN, dtype=np.int32).reshape(1, SEQ_LEN)
    at_2, at_4 = (logits(keras.saving.load_model(p), ids) for p in (early, final))
    assert np.abs(at_2 - at_4).max() > 1e-4  # two steps of Adam at 1e-2 moved the weights
    np.testing.assert_allclose(at_4, logits(model, ids), rtol=1e-5, atol=1e-5)


def test_bad_exports_are_one_line_errors(trained, tmp_path):
    directory, _ = trained
    with pytest.raises(ConfigError, match="format must be one of keras-hub, hf, keras"):
        export(directory, tmp_path / "a", format="onnx")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not an empty folder"):
        export(directory, tmp_path / "full", format="keras")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match=r"No checkpoint of step 3 \(saved steps: 2, 4\)"):
        export(directory, tmp_path / "b", format="keras", step=3)
    with pytest.raises(ConfigError, match="is not a KerasHub model") as err:
        export(directory, tmp_path / "c", format="hf")
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_the_command_line_exports_and_refuses_in_one_line(trained, tmp_path):
    directory, _ = trained

    def cli(*args):  # in this process: the exit code, the line and the files are the point
        return CliRunner().invoke(app, ["export", str(directory), *args])

    done = cli("--format", "keras", "--out", str(tmp_path / "cli"))
    assert done.exit_code == 0, done.stderr
    assert (tmp_path / "cli" / "model.keras").is_file()
    refused = cli("--out", str(tmp_path / "preset"))
    assert refused.exit_code == 2
    assert refused.stderr.strip().splitlines() == [
        "Error: The model 'causal_lm' is not a KerasHub model, so it has no keras-hub form: "
        "export it with --format keras."
    ]
    with contextlib.suppress(FileNotFoundError):
        assert not any((tmp_path / "preset").iterdir())
