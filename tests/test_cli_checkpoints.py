"""Checkpoints through real ``kithara-ops`` processes: signals, SIGKILL mid-save, resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from kithara_ops.cli import app

FAST = ["--model", "tiny", "--data", "synthetic", "--seq-len", "32", "--batch-size", "8"]


def command(*args):
    return [sys.executable, "-m", "kithara_ops.cli", *args]


def env(**extra):
    out = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    out.update(extra)
    return out


def run(*args, **kwargs):
    done = subprocess.run(
        command(*args), capture_output=True, text=True, env=env(), timeout=300, **kwargs
    )
    return done


def endless_training(ckpt, *options):
    """A ``train`` process that runs until it is signalled, checkpointing into ``ckpt``."""
    return subprocess.Popen(
        command("train", *FAST, "--steps", "100000", "--checkpoint-dir", str(ckpt), *options,
                "--quiet"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
    )  # fmt: skip


def last_json(done):
    return json.loads(done.stdout.strip().splitlines()[-1])


def loss_steps(uri, run_id):
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, "loss"))


def wait_for(predicate, timeout=120.0, interval=0.5):
    """Whether ``predicate()`` came true within ``timeout`` s, asked every ``interval`` s (a
    short interval would open the store in this process many times over)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def step_dirs(root: Path):
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


@pytest.mark.slow
def test_cli_resume_in_a_new_process_continues_the_same_mlflow_run(tmp_path, mlflow_server):
    ckpt = tmp_path / "ckpt"
    common = ["--tracking-uri", mlflow_server.uri, "--no-system-metrics", "--json", "--quiet"]
    first = run(
        "train",
        *FAST,
        "--steps",
        "10",
        "--save-every",
        "5",
        "--log-every",
        "1",
        "--checkpoint-dir",
        str(ckpt),
        "--experiment",
        "cli-resume",
        *common[:2],
        *common[2:],
    )
    assert first.returncode == 0, first.stderr
    run_id = last_json(first)["run_id"]
    # The listing and the refusal below need no process of their own: they run in this one.
    listing = CliRunner().invoke(app, ["checkpoints", str(ckpt), "--json"])
    assert [row["step"] for row in json.loads(listing.stdout)] == [5, 10]
    second = run("resume", str(ckpt), "--steps", "20", "--json", "--quiet")
    assert second.returncode == 0, second.stderr
    result = last_json(second)
    assert result["step"] == 20 and result["run_id"] == run_id
    assert loss_steps(mlflow_server.uri, run_id) == list(range(1, 21))
    run_info = MlflowClient(mlflow_server.uri).get_run(run_id)
    assert run_info.info.status == "FINISHED"
    assert run_info.data.tags["kithara_ops.resumed_from_step"] == "10"
    # steps means the run's total: a run already at 20 refuses --steps 20.
    again = CliRunner().invoke(app, ["resume", str(ckpt), "--steps", "20"])
    assert again.exit_code == 2 and "already at step 20" in again.stderr


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_the_current_step_and_exits_with_128_plus_signum(tmp_path, signum, code):
    ckpt, db = tmp_path / "ckpt", f"sqlite:///{tmp_path}/runs.db"
    process = endless_training(ckpt, "--save-every", "1000", "--log-every", "1",
                               "--tracking-uri", db, "--no-system-metrics")  # fmt: skip
    try:
        # The run is training once MLflow holds a few loss points.
        def training():
            try:
                run = only_run(db)
                return len(MlflowClient(db).get_metric_history(run.info.run_id, "loss")) >= 3
            except (IndexError, Exception):
                return False

        assert wait_for(training), (
            process.stderr.read() if process.poll() is not None else "no progress"
        )
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == code, stderr
    name = signal.Signals(signum).name
    stopped = [line for line in stderr.splitlines() if f"stopped by {name} after step" in line]
    assert stopped, stderr
    step = int(stopped[0].split("after step ")[1].split(";")[0])
    assert step_dirs(ckpt) == [step]
    run = MlflowClient(db).search_runs(
        [r.experiment_id for r in MlflowClient(db).search_experiments()]
    )[0]
    assert run.info.status == "KILLED"
    resumed = run_cli_resume(ckpt, step + 3)
    assert resumed["step"] == step + 3 and resumed["run_id"] == run.info.run_id
    assert MlflowClient(db).get_run(run.info.run_id).info.status == "FINISHED"


def only_run(uri):
    """The one run of a store."""
    client = MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])[0]


def run_cli_resume(ckpt, steps):
    """``kithara-ops resume`` in this process: the signal or the kill was the process boundary
    under test; a resume in a new process is ``test_cli_resume_in_a_new_process_...``'s."""
    done = CliRunner().invoke(
        app, ["resume", str(ckpt), "--steps", str(steps), "--json", "--quiet"]
    )
    assert done.exit_code == 0, done.stderr
    return last_json(done)


def test_sigkill_during_an_async_save_resumes_from_the_last_complete_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    process = endless_training(ckpt, "--save-every", "1", "--keep", "50", "--no-tracking")
    try:
        assert wait_for(lambda: len(step_dirs(ckpt)) >= 3), "no checkpoints appeared"

        def saving():  # Orbax writes a save into a temporary directory first
            return any("tmp" in p.name for p in ckpt.iterdir())

        assert wait_for(saving, timeout=60, interval=0.001)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        process.kill()
    leftovers = [p.name for p in ckpt.iterdir() if not p.name.isdigit()]
    complete = step_dirs(ckpt)
    assert complete, leftovers
    listing = json.loads(run("checkpoints", str(ckpt), "--json").stdout)
    assert [row["step"] for row in listing] == complete
    assert not any(row["damaged"] for row in listing)
    resumed = run_cli_resume(ckpt, complete[-1] + 2)
    assert resumed["step"] == complete[-1] + 2
