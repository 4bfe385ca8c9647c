"""The CLI keeps a checkpoint directory to one run and never deletes what it did not write."""

import contextlib

from typer.testing import CliRunner

from kithara_ops.cli import app

FAST = ["--data", "synthetic", "--seq-len", "32", "--no-tracking", "--quiet"]


def cli(*args, cwd):
    """The command run in this process from ``cwd``: these tests check what it does to the
    directory, its exit code and its one line, not a process boundary."""
    with contextlib.chdir(cwd):
        return CliRunner().invoke(app, list(args))


def one_error_line(done):
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    return lines[0]


def test_a_fresh_train_into_a_runs_directory_is_a_usage_error(tmp_path):
    run = tmp_path / "run"
    first = cli("train", *FAST, "--steps", "2", "--checkpoint-dir", str(run), cwd=tmp_path)
    assert first.exit_code == 0, first.stderr
    before = sorted(p.name for p in run.iterdir())
    again = cli("train", *FAST, "--steps", "4", "--checkpoint-dir", str(run), cwd=tmp_path)
    assert again.exit_code == 2
    line = one_error_line(again)
    assert "up to step 2" in line and "--resume" in line and "--overwrite" in line
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written or removed
    replaced = cli("train", *FAST, "--steps", "4", "--checkpoint-dir", str(run), "--overwrite",
                   cwd=tmp_path)  # fmt: skip
    assert replaced.exit_code == 0, replaced.stderr
    assert (run / "4").is_dir() and not (run / "2").exists()


def test_resume_never_deletes_a_numbered_folder_it_did_not_write(tmp_path):
    run = tmp_path / "run"
    notes = run / "2024" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("keep me")
    done = cli("train", *FAST, "--steps", "2", "--checkpoint-dir", str(run), "--resume",
               cwd=tmp_path)  # fmt: skip
    assert done.exit_code == 2
    assert "not checkpoints (2024)" in one_error_line(done)
    assert notes.read_text() == "keep me"
