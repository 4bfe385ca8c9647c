"""Commands that read a checkpoint directory while another run writes it."""

import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from kithara_ops.checkpoint.checkpointer import Checkpointer
from kithara_ops.checkpoint.lock import DirectoryLock
from kithara_ops.cli import app

runner = CliRunner()
FAST = ["--model", "tiny", "--data", "synthetic", "--seq-len", "16", "--batch-size", "8"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A CLI run's checkpoint directory holding steps 2 and 4 (read-only: tests copy it)."""
    directory = tmp_path_factory.mktemp("live") / "run"
    result = runner.invoke(app, ["train", *FAST, "--steps", "4", "--save-every", "2",
                                 "--checkpoint-dir", str(directory), "--no-tracking", "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return directory


def copy_of(trained, tmp_path):
    return shutil.copytree(trained, tmp_path / "run")


def test_resume_while_another_process_trains_there_is_refused_as_in_use(trained, tmp_path):
    directory = copy_of(trained, tmp_path)
    writer = DirectoryLock(directory)
    writer.acquire()
    try:
        for step in ("50", "52"):  # that run's saves in progress
            (directory / step).mkdir()
        for args in (["resume", str(directory), "--steps", "6"],
                     ["train", *FAST, "--steps", "6", "--checkpoint-dir", str(directory),
                      "--resume", "--no-tracking"]):  # fmt: skip
            result = runner.invoke(app, args)
            assert result.exit_code == 2, result.output
            message = result.output.strip()
            assert f"is in use by process {os.getpid()}" in message and "\n" not in message
    finally:
        writer.release()


def vanishing(monkeypatch, method, step):
    """``Checkpointer.method`` deletes checkpoint ``step`` just before reading it, as a run's
    rotation does when it runs at that moment."""
    original = getattr(Checkpointer, method)

    def read(self, at, *args):
        if at == step:
            shutil.rmtree(self.directory / str(at), ignore_errors=True)
        return original(self, at, *args)

    monkeypatch.setattr(Checkpointer, method, read)


def test_export_falls_back_when_its_checkpoint_is_rotated_away(trained, tmp_path, monkeypatch):
    directory = copy_of(trained, tmp_path)
    vanishing(monkeypatch, "restore", 4)
    out = tmp_path / "model"
    result = runner.invoke(app, ["export", str(directory), "--format", "keras", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "model.keras").is_file()
    chosen = runner.invoke(
        app, ["export", str(copy_of(trained, tmp_path / "again")), "--step", "4",
              "--format", "keras", "--out", str(tmp_path / "other")],
    )  # fmt: skip
    assert chosen.exit_code == 2, chosen.output
    assert "Checkpoint step 4 cannot be read" in chosen.output and "Traceback" not in chosen.output


def test_checkpoints_leaves_out_one_rotated_away_while_listed(trained, tmp_path, monkeypatch):
    directory = copy_of(trained, tmp_path)
    vanishing(monkeypatch, "read_record", 2)
    result = runner.invoke(app, ["checkpoints", str(directory), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [row["step"] for row in rows] == [4] and not rows[0]["damaged"]
