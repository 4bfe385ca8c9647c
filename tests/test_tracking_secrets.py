"""A password in the tracking URI appears nowhere a run writes: output, checkpoints, MLflow."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kithara_ops.ports import free_port

SECRET = "s3cr3t-7Hq2"
FAST = ["--model", "tiny", "--data", "synthetic", "--seq-len", "16", "--batch-size", "8",
        "--steps", "2", "--no-system-metrics"]  # fmt: skip


def train(cwd, uri, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(KITHARA_OPS_MLFLOW_FLUSH_TIMEOUT="2", XLA_FLAGS="--xla_force_host_platform_device_count=1")  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "kithara_ops.cli", "train", *FAST, "--tracking-uri", uri, *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=300,
    )  # fmt: skip


def files_holding(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.mark.slow
def test_a_credentialed_tracking_uri_leaves_its_password_nowhere(mlflow_server, tmp_path):
    host = mlflow_server.uri.removeprefix("http://")
    live = train(tmp_path, f"http://alice:{SECRET}@{host}", "--checkpoint-dir", "ckpt",
                 "--experiment", "secrets")  # fmt: skip
    assert live.returncode == 0, live.stderr[-2000:]
    assert f"View experiment at: {mlflow_server.uri}/" in live.stdout  # MLflow's own line
    # A server that is away: the warnings and the spool file name the store.
    away = train(tmp_path, f"http://alice:{SECRET}@127.0.0.1:{free_port()}", "--quiet")
    assert away.returncode == 0, away.stderr[-2000:]
    assert "not delivered" in away.stderr and (tmp_path / "mlflow-spool").is_dir()
    for run in (live, away):
        assert SECRET not in run.stdout and SECRET not in run.stderr
    assert list((tmp_path / "ckpt").iterdir())
    assert files_holding(tmp_path, SECRET.encode()) == []
    assert files_holding(mlflow_server.root, SECRET.encode()) == []
