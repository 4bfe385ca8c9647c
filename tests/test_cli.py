"""``kithara-ops`` as a user runs it: exit codes, one-line errors, real processes."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from kithara_ops import __version__
from kithara_ops.cli import app

runner = CliRunner()
FAST = ["--model", "tiny", "--data", "synthetic", "--seq-len", "32", "--batch-size", "8"]


def run(*args):
    return runner.invoke(app, list(args))


def test_train_as_the_readme_runs_it_shows_progress_and_a_summary(tmp_path):
    """A real process: the bar goes to stderr and the summary to stdout, as a terminal sees
    them."""
    # No --quiet, no --json: the progress bar and the summary table, as a user first sees them.
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    done = subprocess.run(
        [sys.executable, "-m", "kithara_ops.cli", "train", *FAST, "--steps", "4", "--log-every",
         "2", "--no-tracking"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "train" in done.stderr and "4/4" in done.stderr  # the bar, on stderr
    assert "final loss" in done.stdout and "steps" in done.stdout


def test_train_in_a_real_process_prints_json_and_lowers_the_loss(tmp_path):
    """The console script itself: its exit code and a stdout that is the JSON document."""
    exe = shutil.which("kithara-ops")
    command = [exe] if exe else [sys.executable, "-m", "kithara_ops.cli"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    done = subprocess.run(
        [*command, "train", *FAST, "--steps", "40", "--learning-rate", "3e-3", "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["step"] == 40
    assert result["loss"] < 3.0  # from ~5.6 at initialisation on the synthetic corpus
    assert result["metrics"]["tokens_per_second"] > 0


def test_train_with_keras_optimizer_and_fsdp_via_cli_runner():
    result = run(
        "train",
        *FAST,
        "--steps",
        "4",
        "--optimizer",
        "keras.AdamW",
        "--weight-decay",
        "0.01",
        "--sharding",
        "fsdp",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["step"] == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "no/such/file.txt"], "no/such/file.txt"),
        (["--seq-len", "0"], "seq_len"),
        (["--batch-size", "6"], "batch size 6"),
        (["--optimizer", "optax.nope"], "optax.nope"),
        (["--optimizer", "__import__('os').system('echo hacked')"], "__import__"),
        (["--optimizer", "optax.sgd", "--weight-decay", "0.1"], "weight_decay"),
        (["--sharding", "tp"], "sharding"),
        (["--mesh-shape", "3"], "--mesh-shape"),
        (["--model", "nowhere_pkg:factory"], "nowhere_pkg"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_traceback(args, message, eight_devices):
    # On 8 devices (a batch of 6 rows does not split over them). Later options win in
    # click, so ``args`` override the fast defaults.
    result = run("train", *FAST, *args, "--steps", "1")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and message in lines[0]
    assert "Traceback" not in result.output
    assert "hacked" not in result.output


def test_empty_corpus_is_a_usage_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = run("train", "--data", str(empty), "--steps", "1")
    assert result.exit_code == 2
    assert str(empty) in result.stderr


def test_typo_in_an_option_suggests_the_right_one():
    result = run("train", "--stesp", "3")
    assert result.exit_code == 2
    assert "--steps" in result.output


def test_help_and_version():
    assert run("--version").stdout.strip() == f"kithara-ops {__version__}"
    for args in (["--help"], ["train", "--help"]):
        result = run(*args)
        assert result.exit_code == 0
    assert "--optimizer" in run("train", "--help").stdout
