"""Checkpoint reliability: checksums of the arrays, damaged records, time-based saves, and a
save that cannot be written."""

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from conftest import BATCH, SEQ_LEN
from disks import tmpfs
from typer.testing import CliRunner

from kithara_ops import Callback, ConfigError, Trainer, data, models
from kithara_ops._backend import seed_keras
from kithara_ops.checkpoint.checkpointer import Checkpointer
from kithara_ops.checkpoint.restore import restore_latest
from kithara_ops.cli import app
from kithara_ops.errors import CheckpointWriteError

FAST = ["--model", "tiny", "--data", "synthetic", "--seq-len", "32", "--batch-size", "8"]


def trainer_for(**options):
    """A Trainer of the tiny model on synthetic data, seed 0, untracked."""
    options.setdefault("system_metrics", False)
    options.setdefault("tracking", False)
    seed_keras(0)
    model = models.causal_lm("tiny", seq_len=SEQ_LEN)
    train_data = data.load("synthetic", seq_len=SEQ_LEN, batch_size=BATCH, seed=0)
    return Trainer(model, optax.adamw(1e-3), train_data, **options)


def host(tree):
    return jax.tree.map(np.asarray, tree)


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A straight run of 4 steps saved at 2 and 4: its directory and final parameters."""
    directory = tmp_path_factory.mktemp("integrity") / "ckpt"
    trainer = trainer_for(steps=4, save_every=2, checkpoint_dir=str(directory))
    trainer.train()
    return directory, host(trainer.state.params)


def copy_of(saved, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(saved[0], target)
    return target


def flip_bytes(directory, step):
    """Flip 16 bytes in the middle of the largest array data file of a checkpoint."""
    files = [p for p in (directory / str(step) / "state").rglob("*") if p.parent.name == "d"]
    largest = max(files, key=lambda p: p.stat().st_size)
    raw = bytearray(largest.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 16] = bytes(b ^ 0xFF for b in raw[middle : middle + 16])
    largest.write_bytes(bytes(raw))


def edit_record(directory, step, change):
    path = directory / str(step) / "meta" / "metadata"
    values = json.loads(path.read_text())
    change(values)
    path.write_text(json.dumps(values))


# ------------------------------------------------------------------------------- checksums
def test_flipped_bytes_in_an_array_fall_back_to_the_checkpoint_before(saved, tmp_path, caplog):
    directory = copy_of(saved, tmp_path)
    flip_bytes(directory, 4)
    trainer = trainer_for(steps=4, save_every=2, checkpoint_dir=str(directory))
    with caplog.at_level(logging.WARNING, logger="kithara_ops.checkpoint"):
        trainer.train(resume=True)
    assert any("step 4" in w and "cannot be read" in w for w in warnings_of(caplog))
    assert_trees_equal(host(trainer.state.params), saved[1])

    flip_bytes(directory, 4)  # the step 4 written again, damaged again
    with pytest.raises(ConfigError, match=r"^Checkpoint step 4 cannot be read") as err:
        trainer_for(steps=6, checkpoint_dir=str(directory)).train(resume=4)
    assert "\n" not in str(err.value)


def test_an_array_that_does_not_match_its_checksum_is_unreadable(saved, tmp_path, caplog):
    directory = copy_of(saved, tmp_path)
    key = "params/causal_lm/lm_head/kernel"
    edit_record(directory, 4, lambda v: v["checksums"].update({key: v["checksums"][key] ^ 1}))
    with pytest.raises(ConfigError) as err:
        trainer_for(steps=6, checkpoint_dir=str(directory)).train(resume=4)
    assert f"array {key} does not match its checksum" in str(err.value)
    assert "\n" not in str(err.value)

    trainer = trainer_for(steps=4, checkpoint_dir=str(directory))
    with caplog.at_level(logging.WARNING, logger="kithara_ops.checkpoint"):
        trainer.train(resume=True)
    assert any("does not match its checksum" in w for w in warnings_of(caplog))
    assert_trees_equal(host(trainer.state.params), saved[1])


def test_a_record_without_checksums_restores_unverified(saved, tmp_path):
    directory = copy_of(saved, tmp_path)

    def as_version_1(values):
        values["version"] = 1
        del values["checksums"]

    edit_record(directory, 4, as_version_1)
    trainer = trainer_for(steps=4, checkpoint_dir=str(directory))
    with contextlib.closing(Checkpointer(directory)) as store:
        assert store.read_record(4).checksums is None
        restored = restore_latest(store, trainer.state_template(), 4, False)
    assert restored.step == 4
    assert_trees_equal(host(restored.state.params), saved[1])


# -------------------------------------------------------------------------- damaged records
DAMAGE = {"truncated": lambda text: text[: len(text) // 2], "garbage": lambda text: "\x00@#!%"}


@pytest.fixture(scope="module")
def built_run(tmp_path_factory):
    """A run built from its config (as the CLI builds it), saved at steps 2 and 4."""
    from kithara_ops.build import build_trainer
    from kithara_ops.config import RunConfig

    directory = tmp_path_factory.mktemp("built") / "ckpt"
    config = RunConfig(
        model="tiny",
        data="synthetic",
        seq_len=SEQ_LEN,
        batch_size=BATCH,
        steps=4,
        save_every=2,
        checkpoint_dir=str(directory),
        tracking=False,
        system_metrics=False,
    )
    build_trainer(config).train()
    return directory


def damage_record(directory, step, how):
    path = directory / str(step) / "meta" / "metadata"
    path.write_text(DAMAGE[how](path.read_text()))


def assert_continued_from_step_2(directory):
    """Step 4 was trained again from step 2: its record reads back, and step 6 was saved."""
    with contextlib.closing(Checkpointer(directory)) as store:
        assert store.steps()[-2:] == [4, 6]
        assert store.read_record(4).step == 4 and store.read_record(6).step == 6


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_a_damaged_newest_record_falls_back_in_train(saved, tmp_path, caplog, how):
    directory = copy_of(saved, tmp_path)
    damage_record(directory, 4, how)
    trainer = trainer_for(steps=6, save_every=2, checkpoint_dir=str(directory))
    with caplog.at_level(logging.WARNING, logger="kithara_ops.checkpoint"):
        trainer.train(resume=True)
    assert any("step 4" in w and "cannot be read" in w for w in warnings_of(caplog))
    assert int(trainer.state.step) == 6
    assert_continued_from_step_2(directory)


def run_cli(*args, cwd):
    """A real process: a failed save's Orbax and TensorStore logs reach stderr only in one,
    and the exit code is what a shell sees."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    return subprocess.run(
        [sys.executable, "-m", "kithara_ops.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


@pytest.mark.parametrize(
    ("command", "how"),
    [("resume", "garbage"), ("resume", "truncated"), ("train", "truncated")],
)
def test_a_damaged_newest_record_falls_back_on_the_command_line(
    built_run, tmp_path, monkeypatch, caplog, command, how
):
    """The garbage record is read back by a real process (stderr as a shell sees it); the
    truncated ones run the same command in this process, through ``CliRunner``, where the
    warning is read from the log records (the CLI's log handler keeps the process's stderr)."""
    directory = tmp_path / "ckpt"
    shutil.copytree(built_run, directory)
    damage_record(directory, 4, how)
    if command == "resume":
        args = ["resume", str(directory), "--steps", "6", "--json"]
    else:
        args = ["train", *FAST, "--checkpoint-dir", str(directory), "--steps", "6"]
        args += ["--save-every", "2", "--no-tracking", "--resume", "--json"]
    if how == "garbage":
        done = run_cli(*args, cwd=tmp_path)
        code, stdout, stderr = done.returncode, done.stdout, done.stderr
    else:
        monkeypatch.chdir(tmp_path)
        with caplog.at_level(logging.WARNING, logger="kithara_ops.checkpoint"):
            done = CliRunner().invoke(app, args)
        code, stdout = done.exit_code, done.stdout
        stderr = done.stderr + "\n".join(warnings_of(caplog))
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert "step 4" in stderr and "cannot be read" in stderr
    assert json.loads(stdout.strip().splitlines()[-1])["step"] == 6
    assert_continued_from_step_2(directory)


# ------------------------------------------------------------------------ time-based saves
class SleepAfter(Callback):
    """Sleeps after the given steps (after the checkpointer has seen them)."""

    def __init__(self, steps, seconds):
        self.steps, self.seconds = set(steps), seconds

    def on_step(self, record):
        if record.step in self.steps:
            time.sleep(self.seconds)


def test_save_every_minutes_saves_when_the_time_is_up(tmp_path):
    directory = tmp_path / "ckpt"
    # 0.06 minutes is 3.6 s: only the steps after a 5 s pause are late enough to save (the
    # margin is for a busy machine, where a step and a save can take a second or more).
    trainer = trainer_for(
        steps=7,
        save_every_minutes=0.06,
        keep=10,
        checkpoint_dir=str(directory),
        callbacks=[SleepAfter({3, 5}, 5.0)],
    )
    trainer.train()
    with contextlib.closing(Checkpointer(directory)) as store:
        saved_steps = set(store.steps())
    # Step 1 may save too when compiling took longer than 3.6 s; 7 is the final save.
    assert {4, 6, 7} <= saved_steps and not {2, 5} & saved_steps, saved_steps


def test_save_every_minutes_must_be_positive():
    from kithara_ops.config import RunConfig

    with pytest.raises(ConfigError, match="save_every_minutes must be > 0"):
        RunConfig(save_every_minutes=0)
    assert RunConfig(save_every_minutes="1.5").save_every_minutes == 1.5


# -------------------------------------------------------------------------- a failed save
def small_disk(directory, size):
    """``directory`` as a tmpfs of ``size`` bytes."""
    return tmpfs(directory, f"size={size}")


def test_a_save_that_runs_out_of_space_stops_the_run_and_keeps_the_last_one(saved, tmp_path):
    one_checkpoint = sum(p.stat().st_size for p in (saved[0] / "2").rglob("*") if p.is_file())
    # Room for the first checkpoint, not for a second one.
    with small_disk(tmp_path / "ckpt", int(one_checkpoint * 1.5)) as directory:
        # Step 4 is the last: its save fails while the step is reported, so the run fails.
        trainer = trainer_for(steps=4, save_every=2, checkpoint_dir=str(directory))
        with pytest.raises(CheckpointWriteError) as err:
            trainer.train()
        message = str(err.value)
        assert "\n" not in message
        assert str(directory) in message and "step 2 is the last complete one" in message
        assert "(No space left on device)" in message, message
        assert not list(directory.glob("*.orbax-checkpoint-tmp*"))
        assert not (directory / ".kithara-ops.lock").exists()
        with contextlib.closing(Checkpointer(directory)) as store:
            assert store.steps() == [2]
            restored = restore_latest(store, trainer_for(steps=8).state_template(), True, False)
        assert restored.step == 2


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_the_command_line_reports_a_failed_save_in_one_line(saved, tmp_path, debug):
    one_checkpoint = sum(p.stat().st_size for p in (saved[0] / "2").rglob("*") if p.is_file())
    # Room for two checkpoints, which the pre-flight check asks for, not for a third.
    with small_disk(tmp_path / "small", int(one_checkpoint * 2.4)) as mounted:
        directory = mounted / "ckpt"
        args = ["train", *FAST, "--checkpoint-dir", str(directory), "--steps", "8"]
        args = ["--debug", *args] if debug else args
        done = run_cli(*args, "--save-every", "2", "--no-tracking", "--json", cwd=tmp_path)
        assert done.returncode == 1, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        if debug:  # the error's traceback and the libraries' own output, and the same line
            assert "Traceback" in done.stderr and "CheckpointWriteError" in done.stderr
            # Their threads write to stderr too (their own "Error: ..." lines among them), so
            # the run's line may follow theirs unbroken.
            # (The traceback's "CheckpointWriteError: checkpoint step ..." is not that line.)
            ours = re.compile(r"(?<![A-Za-z])Error: checkpoint step.*")
            lines = [found.group(0) for line in lines if (found := ours.search(line))]
        else:  # Orbax's and TensorStore's own error logs and tracebacks are hidden
            assert "Traceback" not in done.stderr and "ERROR:absl" not in done.stderr
        assert lines == [
            f"Error: checkpoint step 6 could not be written to {str(directory)!r} (No space "
            "left on device); step 4 is the last complete one: free space or fix the "
            "directory, then resume."
        ], done.stderr[-3000:]
        assert not list(directory.glob("*.orbax-checkpoint-tmp*"))
        with contextlib.closing(Checkpointer(directory)) as store:
            assert store.steps() == [2, 4]
