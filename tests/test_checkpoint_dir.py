"""A checkpoint directory belongs to one run: foreign files, a second writer, overwrites."""

import json
import os
import shutil
import socket
import subprocess
import sys

import optax
import pytest
from conftest import BATCH, SEQ_LEN

from kithara_ops import ConfigError, Trainer, data
from kithara_ops.checkpoint.checkpointer import Checkpointer
from kithara_ops.checkpoint.lock import LOCK_NAME, DirectoryLock


def trainer(make_model, directory, steps=2, **options):
    batches = data.load("synthetic", seq_len=SEQ_LEN, batch_size=BATCH, seed=0)
    return Trainer(
        make_model(), optax.sgd(0.1), batches, steps=steps, checkpoint_dir=str(directory),
        tracking=False, **options,
    )  # fmt: skip


def steps_of(directory):
    store = Checkpointer(directory)
    try:
        return store.steps()
    finally:
        store.close()


def test_a_fresh_run_into_another_runs_directory_is_refused(make_model, tmp_path):
    trainer(make_model, tmp_path, steps=2).train()
    assert steps_of(tmp_path) == [2]
    with pytest.raises(ConfigError) as refused:
        trainer(make_model, tmp_path, steps=3).train()
    message = str(refused.value)
    assert "\n" not in message and "up to step 2" in message
    assert "--resume" in message and "--overwrite" in message
    assert steps_of(tmp_path) == [2]  # nothing was touched
    result = trainer(make_model, tmp_path, steps=3).train(overwrite=True)
    assert result.step == 3 and steps_of(tmp_path) == [3]


def test_folders_that_are_not_checkpoints_are_never_deleted(make_model, tmp_path):
    notes = tmp_path / "2024" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("mine")
    with pytest.raises(ConfigError, match=r"not checkpoints \(2024\)"):
        trainer(make_model, tmp_path).train(resume=True)
    with pytest.raises(ConfigError, match=r"not checkpoints \(2024\)"):
        trainer(make_model, tmp_path).train(overwrite=True)
    assert notes.read_text() == "mine"
    store = Checkpointer(tmp_path)
    try:
        assert store.steps() == [] and store.foreign() == ["2024"]
        with pytest.raises(ValueError, match="not a checkpoint"):
            store.delete(2024)
    finally:
        store.close()
    assert notes.read_text() == "mine"


def test_a_live_writer_holds_the_directory(make_model, tmp_path):
    holder = DirectoryLock(tmp_path)
    holder.acquire()
    try:
        with pytest.raises(ConfigError) as refused:
            trainer(make_model, tmp_path).train()
        message = str(refused.value)
        assert f"process {os.getpid()} on {socket.gethostname()}" in message
        assert LOCK_NAME in message and "\n" not in message
    finally:
        holder.release()
    assert not (tmp_path / LOCK_NAME).exists()
    result = trainer(make_model, tmp_path).train()
    assert result.step == 2 and not (tmp_path / LOCK_NAME).exists()  # released at the end


def test_a_stale_lock_of_a_dead_process_is_taken_over(make_model, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stale = {"pid": int(dead.stdout), "host": socket.gethostname(), "started": "earlier"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(stale))
    assert trainer(make_model, tmp_path).train().step == 2


def test_a_lock_from_another_host_is_respected(tmp_path):
    other = {"pid": 1, "host": "elsewhere.example", "started": "2026-01-01T00:00:00+00:00"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(other))
    with pytest.raises(ConfigError, match=r"process 1 on elsewhere\.example"):
        DirectoryLock(tmp_path).acquire()
    shutil.rmtree(tmp_path)
