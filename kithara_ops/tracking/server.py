"""Starting and stopping a local ``mlflow server`` (for ``kithara-ops ui`` and benchmarks).

The server runs in its own session so that stopping it takes its uvicorn workers with it:
the whole process group is signalled. MLflow's job workers are not started (see ``start``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from kithara_ops.ports import free_port


class LocalServer:
    """An ``mlflow server`` on the loopback interface.

    Args:
      backend_store_uri: where runs are kept (e.g. ``sqlite:///mlflow.db``).
      artifact_root: folder for artifacts (``None``: MLflow's default).
      port: the port (``None``: a free one).
      log_path: file for the server's output (``None``: discarded).
    """

    def __init__(
        self,
        backend_store_uri: str,
        artifact_root: str | Path | None = None,
        port: int | None = None,
        log_path: str | Path | None = None,
        host: str = "127.0.0.1",
    ):
        self.host = host
        self.port = port or free_port(host)
        self.uri = f"http://{host}:{self.port}"
        self.backend_store_uri = backend_store_uri
        self.artifact_root = artifact_root
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> LocalServer:
        """Start the server and wait until ``/health`` answers; raise ``RuntimeError`` if not."""
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--host", self.host, "--port", str(self.port),
            "--backend-store-uri", self.backend_store_uri, "--workers", "1",
        ]  # fmt: skip
        if self.artifact_root is not None:
            command += ["--default-artifact-root", str(self.artifact_root)]
        output = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        # MLflow 3's server also starts job workers (huey consumers) for server-side jobs
        # that viewing and logging runs never use: off unless the environment asks for them.
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
        self.process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with code {self.process.returncode}.")
            if self.healthy():
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer on {self.uri} within {timeout:.0f} s.")

    def healthy(self) -> bool:
        """Whether ``GET /health`` answers now."""
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server and every process it started."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
