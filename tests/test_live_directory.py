"""Commands that read a checkpoint directory while another run writes it."""

import os
import shutil

import pytest
from typer.testing import CliRunner

from kithara_ops.cli import app
from kithara_ops.run_lock import DirectoryLock

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
