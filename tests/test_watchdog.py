"""The watchdog: a run whose steps stop coming ends, with exit code 75, one line, and an
MLflow run that says it hung and where; a run that makes progress is never touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from kithara_ops.callbacks import StepRecord
from kithara_ops.cli import app
from kithara_ops.config import RunConfig
from kithara_ops.errors import ConfigError
from kithara_ops.watchdog import EXIT_HANG, Watchdog

STUCK = Path(__file__).parent / "fixtures" / "stuck_data.py"


def watched(timeout: float):
    """A watchdog whose notice and end are recorded instead of ending this process."""
    told, ended = [], threading.Event()

    def end(code):
        told.append(("end", code))
        ended.set()

    dog = Watchdog(timeout, notify=lambda step, s: told.append(("hang", step, s)), grace=1.0,
                   end=end)  # fmt: skip
    return dog, told, ended


def test_the_watchdog_waits_for_the_first_step_then_ends_a_silent_run_once(capfd):
    dog, told, ended = watched(0.3)
    dog.on_train_start(None)
    time.sleep(0.6)  # compiling: the first step has not finished, nothing is timed yet
    assert not told
    for step in (1, 2, 3):
        dog.on_step(StepRecord(step, None, None, 0.0))
        time.sleep(0.1)
    dog.on_log(3, {})
    assert ended.wait(5)
    hang, end = told
    assert hang[:2] == ("hang", 3) and 0.3 < hang[2] < 2.0 and end == ("end", EXIT_HANG)
    lines = capfd.readouterr().err.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("Error: no step finished") and "step 3" in lines[0]
    )


def test_a_run_that_ends_stops_its_watchdog():
    dog, told, ended = watched(0.2)
    dog.on_train_start(None)
    dog.on_step(StepRecord(1, None, None, 0.0))
    dog.on_train_end("FINISHED", None)
    assert not ended.wait(0.8) and not told
    assert not dog._thread.is_alive()


def test_a_step_timeout_must_be_positive():
    with pytest.raises(ConfigError, match="step_timeout"):
        RunConfig(step_timeout=0)
    done = CliRunner().invoke(app, ["train", "--step-timeout", "-5", "--no-tracking"])
    assert done.exit_code == 2 and "step_timeout" in done.stderr


def test_a_run_with_a_timeout_it_never_reaches_trains_as_usual(tmp_path):
    args = ["train", "--model", "tiny", "--data", "synthetic", "--seq-len", "16", "--batch-size",
            "4", "--steps", "3", "--step-timeout", "300", "--no-tracking", "--json", "--quiet"]  # fmt: skip
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout.strip().splitlines()[-1])["step"] == 3


@pytest.mark.slow
def test_a_run_whose_data_stops_coming_ends_as_hung_with_exit_75(tmp_path):
    """A real process: the exit code and the one line are what a scheduler sees."""
    uri = f"sqlite:///{tmp_path}/runs.db"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(STUCK), uri, "3"], capture_output=True, text=True,
                          env=env, timeout=240)  # fmt: skip
    ended = time.time()
    assert done.returncode == EXIT_HANG, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "no step finished" in errors[0] and "exit 75" in errors[0]
    assert "Traceback" not in done.stderr
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("hang").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["kithara_ops.stop_reason"] == "hang"
    history = client.get_metric_history(run.info.run_id, "loss")
    last = max(history, key=lambda m: m.step)
    assert run.data.tags["kithara_ops.hang_step"] == str(last.step) and last.step >= 1
    # Ended within the timeout, a poll and the sinks' bounded wait after the last step.
    assert ended - last.timestamp / 1000 < 3 + 1 + 15
    assert run.info.end_time / 1000 - last.timestamp / 1000 >= 3
    assert time.monotonic() - started < 240
