"""Multi-process runs on one machine: several JAX processes on virtual CPU devices.

Two processes of two devices each train the same run as one process of four devices: the
same global batches, the same parameters at the end, one MLflow run, one checkpoint
directory written by both processes, which a different number of processes can resume. Two
processes of one device each (one process per GPU) train, save and resume too.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from mlflow import MlflowClient
from test_cli_config_sweep import final_params
from typer.testing import CliRunner

from kithara_ops.checkpoint.checkpointer import Checkpointer
from kithara_ops.cli import app
from kithara_ops.cli.launch import process_commands, process_env
from kithara_ops.distributed import initialize

CLI = [sys.executable, "-m", "kithara_ops.cli"]
RUN = ["--model", "tiny", "--data", "synthetic", "--seq-len", "32", "--batch-size", "8",
       "--sharding", "fsdp", "--optimizer", "optax.adamw(0.001, eps=0.0001)",
       "--eval-data", "synthetic", "--eval-steps", "2", "--no-system-metrics", "--json"]  # fmt: skip
TIMEOUT = 300


def cli(*args, devices=None):
    """Run ``kithara-ops ARGS`` in a new process; ``devices`` virtual CPU devices if given."""
    return started(*args, devices=devices).wait_done()


class _Run(subprocess.Popen):
    def wait_done(self) -> subprocess.CompletedProcess:
        stdout, stderr = self.communicate(timeout=TIMEOUT)
        return subprocess.CompletedProcess(self.args, self.returncode, stdout, stderr)


def started(*args, devices=None) -> _Run:
    """``kithara-ops ARGS`` started in a new process, not waited for."""
    env = dict(os.environ)
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return _Run([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def result_of(done):
    """The ``--json`` result: the last line of stdout (Gloo writes its own lines there)."""
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def launch_train(*args, wait=True):
    """``train ARGS`` as 2 processes x 2 CPU devices."""
    run = started("launch", "--num-processes", "2", "--devices-per-process", "2", "--",
                  "train", *RUN, *args)  # fmt: skip
    return run.wait_done() if wait else run


def run_count(uri):
    """How many MLflow runs the store holds, across all experiments."""
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(experiments))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 5 steps trained by 2 processes x 2 devices and by 1 process x 4 devices,
    both started at once."""
    two, one = tmp_path_factory.mktemp("two"), tmp_path_factory.mktemp("one")
    uris = {root: f"sqlite:///{root}/mlflow.db" for root in (two, one)}
    two_run = launch_train("--steps", "5", "--checkpoint-dir", str(two / "ckpt"),
                           "--tracking-uri", uris[two], wait=False)  # fmt: skip
    one_run = started("train", *RUN, "--steps", "5", "--checkpoint-dir", str(one / "ckpt"),
                      "--tracking-uri", uris[one], devices=4)  # fmt: skip
    return {
        "two": {"done": two_run.wait_done(), "dir": two / "ckpt", "uri": uris[two]},
        "one": {"done": one_run.wait_done(), "dir": one / "ckpt", "uri": uris[one]},
    }


@pytest.fixture(scope="module")
def two_processes(runs):
    """5 steps trained by 2 processes x 2 devices."""
    return runs["two"]


@pytest.fixture(scope="module")
def one_process(runs):
    """The same 5 steps trained by 1 process x 4 devices."""
    return runs["one"]


def assert_params_close(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)


@pytest.mark.slow
def test_two_processes_train_the_run_one_process_trains(two_processes, one_process):
    two, one = result_of(two_processes["done"]), result_of(one_process["done"])
    assert two["step"] == one["step"] == 5
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-4)
    assert_params_close(final_params(two_processes["dir"]), final_params(one_process["dir"]))
    # Only process 0 logs: one MLflow run, the one the result and the checkpoint name.
    assert run_count(two_processes["uri"]) == 1
    run = MlflowClient(two_processes["uri"]).get_run(two["run_id"])
    assert run.data.tags["jax.process_count"] == "2"
    assert run.data.params["num_processes"] == "2"
    assert "process_id" not in run.data.params and "coordinator" not in run.data.params


@pytest.mark.slow
def test_checkpoints_resume_with_another_number_of_processes(two_processes, one_process, tmp_path):
    result_of(two_processes["done"])
    result_of(one_process["done"])
    from_two, from_one = tmp_path / "from-two", tmp_path / "from-one"
    shutil.copytree(two_processes["dir"], from_two)
    shutil.copytree(one_process["dir"], from_one)

    # Saved by 2 processes, resumed by 1 (its config holds no process options).
    resumed = result_of(cli("resume", str(from_two), "--steps", "7", "--json", devices=4))
    assert resumed["step"] == 7
    # Saved by 1 process, resumed by 2, in the same MLflow run.
    done = launch_train("--steps", "7", "--resume", "--checkpoint-dir", str(from_one),
                        "--tracking-uri", one_process["uri"])  # fmt: skip
    resumed = result_of(done)
    assert resumed["step"] == 7
    assert resumed["run_id"] == result_of(one_process["done"])["run_id"]
    assert run_count(one_process["uri"]) == 1
    # Both continued the same state on the same batches.
    assert_params_close(final_params(from_two), final_params(from_one))


@pytest.mark.slow
def test_one_device_per_process_trains_checkpoints_and_resumes_in_one_process(tmp_path):
    """2 processes x 1 device, the layout of one process per GPU, then 1 process x 2 devices.

    It needs real processes: only there does an array span devices this process cannot
    address, and only with one device per process does each such array hold a single local
    shard, which JAX cannot list for an array placed from one device (the state's replicated
    parameters and its key).
    """
    ckpt = tmp_path / "ckpt"
    done = cli("launch", "--num-processes", "2", "--devices-per-process", "1", "--",
               "train", *RUN, "--steps", "4", "--save-every", "2", "--checkpoint-dir", str(ckpt),
               "--no-tracking")  # fmt: skip
    two = result_of(done)
    assert two["step"] == 4
    assert Checkpointer(ckpt).steps() == [2, 4]
    # fsdp over the two processes' devices: each holds half the split parameters.
    assert 0 < two["state_bytes"]["per_device"] < two["state_bytes"]["total"]
    resumed = result_of(cli("resume", str(ckpt), "--steps", "6", "--json", devices=2))
    assert resumed["step"] == 6
    # One process of two devices places the state as the two processes did.
    assert resumed["state_bytes"] == two["state_bytes"]


@pytest.mark.slow
def test_launch_fails_with_its_processes_exit_code():
    done = cli("launch", "-n", "2", "--", "train", *RUN, "--seq-len", "0", "--steps", "1")
    assert done.returncode == 2
    assert "seq_len" in done.stderr


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["describe"], "launch runs one of train, resume"),
        (["train", "--process-id", "1"], "launch sets --process-id itself"),
        (["train", "--coordinator=127.0.0.1:1"], "launch sets --coordinator itself"),
    ],
)
def test_launch_refuses_commands_it_cannot_run(command, message):
    result = CliRunner().invoke(app, ["launch", "-n", "2", "--", *command])
    assert result.exit_code == 2
    assert message in result.stderr


def test_process_commands_and_environment():
    commands = process_commands(["train", "--steps", "3"], 3, 1234)
    assert [c[c.index("--process-id") + 1] for c in commands] == ["0", "1", "2"]
    assert all("--coordinator" in c and "127.0.0.1:1234" in c for c in commands)
    assert ["--quiet" in c for c in commands] == [False, True, True]
    env = process_env(3, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo"})
    assert env["XLA_FLAGS"] == "--xla_foo --xla_force_host_platform_device_count=3"
    assert env["JAX_PLATFORMS"] == "cpu"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"coordinator": "127.0.0.1:1234"}, "missing: num_processes, process_id"),
        ({"num_processes": 2, "process_id": 0}, "missing: coordinator"),
        ({"coordinator": "nohost", "num_processes": 2, "process_id": 0}, "HOST:PORT"),
        ({"coordinator": "127.0.0.1:1", "num_processes": 2, "process_id": 2}, "process_id"),
    ],
)
def test_partial_or_bad_distributed_options_are_refused(options, message):
    from kithara_ops import ConfigError, RunConfig

    with pytest.raises(ConfigError, match=message):
        initialize(**{"coordinator": None, "num_processes": None, "process_id": None, **options})
    with pytest.raises(ConfigError, match=message):
        RunConfig(**options)


def test_without_options_nothing_is_initialized(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("KITHARA_OPS_DISTRIBUTED", raising=False)
    assert initialize(None, None, None) is False
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert initialize(None, None, None) is False  # a one-task job is a single process
