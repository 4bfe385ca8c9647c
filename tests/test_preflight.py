"""Pre-flight checks: checkpoint directory, tracking URI, token ids, and ``--json`` output."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import keras
import numpy as np
import pytest
from disks import tmpfs

from kithara_ops import preflight
from kithara_ops.build import build_trainer
from kithara_ops.callbacks import TrainResult
from kithara_ops.cli.progress import finite_or_none, print_summary, stdout_for_json
from kithara_ops.config import RunConfig
from kithara_ops.errors import ConfigError
from kithara_ops.models.registry import output_vocab_size

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--model", "tiny", "--data", "synthetic", "--seq-len", "32", "--batch-size", "8"]


def small_model(vocab: int = 64, output_rank: int = 3) -> keras.Model:
    ids = keras.Input((None,), dtype="int32")
    hidden = keras.layers.Embedding(vocab, 8)(ids)
    if output_rank == 2:
        hidden = keras.layers.GlobalAveragePooling1D()(hidden)
    return keras.Model(ids, keras.layers.Dense(vocab)(hidden))


# ------------------------------------------------------------------------ checkpoint directory
def test_a_file_or_a_path_under_a_file_is_refused(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("x")
    with pytest.raises(ConfigError, match="is a file: pass a directory path"):
        preflight.check_checkpoint_path(taken)
    with pytest.raises(ConfigError, match=r"cannot be created: .*taken' is a file"):
        preflight.check_checkpoint_path(taken / "run" / "deeper")


def test_a_new_directory_is_checked_in_its_parent_and_nothing_is_left(tmp_path):
    assert preflight.check_checkpoint_path(tmp_path / "a" / "b") == tmp_path
    assert list(tmp_path.iterdir()) == []  # neither the directory nor the probe file


def test_a_read_only_file_system_is_refused(tmp_path):
    with (
        tmpfs(tmp_path / "ro", "ro,size=1m") as mounted,
        pytest.raises(ConfigError, match=r"is not writable .*Read-only file system"),
    ):
        preflight.check_checkpoint_path(mounted / "run")


def test_state_bytes_is_three_copies_of_the_variables():
    model = small_model(64)
    variables = sum(int(np.prod(v.shape)) * 4 for v in model.variables)
    assert preflight.state_bytes(model) == 3 * variables


def test_a_disk_without_room_for_two_checkpoints_is_refused(tmp_path, monkeypatch):
    model = small_model(64)
    need = 2 * preflight.state_bytes(model)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(need, 0, need - 1))
    with pytest.raises(ConfigError) as refused:
        preflight.check_checkpoint_room(tmp_path / "run", model)
    message = str(refused.value)
    assert re.fullmatch(
        r"Checkpoint directory '.*run' has [\d.,]+ KiB free but two checkpoints of this run "
        r"need about [\d.,]+ KiB: free space or choose another --checkpoint-dir\.",
        message,
    ), message
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(need, 0, need))
    preflight.check_checkpoint_room(tmp_path / "run", model)


def test_a_small_real_file_system_is_refused_with_mib(tmp_path, make_model):
    model = make_model()
    with (
        tmpfs(tmp_path / "small", "size=1m") as mounted,
        pytest.raises(ConfigError, match=r"has 1 MiB free but two checkpoints .* MiB"),
    ):
        preflight.check_checkpoint_room(mounted / "run", model)


# ------------------------------------------------------------------------ tracking URI
@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:///mlflow.db",
        "http://127.0.0.1:5000",
        "https://host",
        "file:///tmp/mlruns",
        "postgresql://user@host/db",
        "databricks",
    ],
)
def test_known_tracking_uris_pass(uri, monkeypatch):
    if uri == "databricks":  # a bare profile name has no scheme and is refused
        with pytest.raises(ConfigError, match="not a URI"):
            preflight.check_tracking_uri(uri)
        return
    preflight.check_tracking_uri(uri)


def test_unknown_scheme_lists_the_known_ones():
    with pytest.raises(ConfigError) as refused:
        preflight.check_tracking_uri("foo://bar")
    message = str(refused.value)
    assert "'foo'" in message and "\n" not in message
    for scheme in ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https"):
        assert scheme in message
    assert set(preflight.tracking_schemes()) >= {"sqlite", "http", "https", "databricks"}


@pytest.mark.parametrize("uri", ["not a uri", "mlruns", ":nothing", "1http://x"])
def test_text_that_is_no_uri_is_refused(uri):
    with pytest.raises(ConfigError, match="is not a URI: write scheme:location"):
        preflight.check_tracking_uri(uri)


def test_the_environment_variable_is_checked_and_named(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "foo://bar")
    with pytest.raises(ConfigError, match=r"\$MLFLOW_TRACKING_URI"):
        preflight.check_tracking_uri(None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    preflight.check_tracking_uri(None)


# ------------------------------------------------------------------------ token ids
def test_ids_past_the_vocabulary_name_both_numbers():
    batch = {"x": np.array([[1, 2, 300]]), "y": np.array([[2, 300, 5]])}
    with pytest.raises(
        ConfigError, match=r"^batch ids reach 300 but the model's vocabulary is 259"
    ):
        preflight.check_token_ids(batch, 259)
    preflight.check_token_ids(batch, 301)
    preflight.check_token_ids(batch, None)
    with pytest.raises(ConfigError, match="down to -1"):
        preflight.check_token_ids({"x": np.array([[-1, 0]]), "y": np.array([[0, 0]])}, 10)


def test_output_vocab_size_reads_the_logits_shape(make_model):
    assert output_vocab_size(make_model(), 32) == 259
    assert output_vocab_size(small_model(64), 32) == 64
    assert output_vocab_size(small_model(64, output_rank=2), 32) is None


def test_build_trainer_refuses_a_model_smaller_than_the_data(tmp_path, monkeypatch):
    (tmp_path / "vocab64_factory.py").write_text(
        "import keras\n\n\ndef build() -> keras.Model:\n"
        "    ids = keras.Input((None,), dtype='int32')\n"
        "    hidden = keras.layers.Embedding(64, 8)(ids)\n"
        "    return keras.Model(ids, keras.layers.Dense(64)(hidden))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = RunConfig(
        model="vocab64_factory:build", data="synthetic", seq_len=32, tracking=False,
        checkpoint_dir=str(tmp_path / "run"),
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"batch ids reach 25\d but the model's vocabulary is 64"):
        build_trainer(config)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------ --json
def test_non_finite_values_become_null():
    result = TrainResult(2, math.nan, math.inf, 1.0, 0.5, {"loss": -math.inf, "n": 3})
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_summary(result, as_json=True)
    document = json.loads(out.getvalue())
    assert document["loss"] is None and document["eval_loss"] is None
    assert document["metrics"] == {"loss": None, "n": 3}
    assert finite_or_none([1.5, np.float32("nan"), (2,)]) == [1.5, None, [2]]


def test_stdout_for_json_sends_prints_to_stderr(capsys):
    with stdout_for_json(True):
        print("library chatter")
    with stdout_for_json(False):
        print("shown")
    captured = capsys.readouterr()
    assert captured.out == "shown\n" and "library chatter" in captured.err


def test_json_against_a_tracking_server_is_one_document(tmp_path, mlflow_server):
    """A real process: stdout is one JSON document while MLflow and the libraries log."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kithara_ops.cli",
            "train",
            *FAST,
            "--steps",
            "2",
            "--json",
            "--tracking-uri",
            mlflow_server.uri,
            "--experiment",
            "json-output",
            "--no-system-metrics",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)  # the whole stdout, not its last line
    assert document["step"] == 2 and document["run_id"]
    assert "View run" in done.stderr
