"""Pytest plugin: a real ``mlflow server`` process for the whole test session.

Load it with ``pytest_plugins = ["mlflow_server"]`` and request the ``mlflow_server``
fixture. The server listens on 127.0.0.1 on a free port, keeps its runs in a SQLite file and
its artifacts in a folder of the session's temporary directory, and can be stopped and started
again on the same port and store (to test a tracking-server outage during a run).
``MlflowServer(root, backend_store_uri=...)`` starts one on another store (e.g. PostgreSQL).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from kithara_ops.ports import free_port

START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


class MlflowServer:
    """An ``mlflow server`` subprocess with its own port, SQLite store and artifact folder.

    Attributes:
        root: The folder holding ``mlflow.db``, ``artifacts/`` and ``server.log``.
        port: The port, the same across restarts.
        uri: ``http://127.0.0.1:<port>``, the tracking URI for clients.
        backend_store_uri: The store's URI: ``sqlite:///<root>/mlflow.db`` unless another
            (e.g. ``postgresql://...``) is given.
        serve_artifacts: Whether clients send artifacts through the server
            (``--artifacts-destination``) instead of writing to ``artifacts/`` themselves.
        log_path: The server's combined stdout and stderr, appended to across restarts.
    """

    def __init__(
        self,
        root: Path,
        port: int | None = None,
        backend_store_uri: str | None = None,
        serve_artifacts: bool = False,
    ) -> None:
        self.root = Path(root)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.backend_store_uri = backend_store_uri or f"sqlite:///{self.root / 'mlflow.db'}"
        self.serve_artifacts = serve_artifacts
        self.artifact_root = self.root / "artifacts"
        self.log_path = self.root / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        """Whether the server process is alive (not whether it answers yet)."""
        return self._proc is not None and self._proc.poll() is None

    def healthy(self, timeout: float = 2.0) -> bool:
        """Whether ``GET /health`` answers 200 now."""
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=timeout) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the server (a no-op if it runs) and wait until ``/health`` answers.

        Raises:
            RuntimeError: The server exited or did not answer within ``timeout`` seconds;
                the message ends with the tail of its log.
        """
        if self.running:
            return
        self.artifact_root.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            self.backend_store_uri,
        ]
        if self.serve_artifacts:
            command += ["--artifacts-destination", str(self.artifact_root), "--serve-artifacts"]
        else:
            command += ["--default-artifact-root", str(self.artifact_root)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        # MLflow 3's server also starts job workers (huey consumers, for server-side
        # evaluation jobs): half a dozen processes no test uses, on a machine of two cores.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                command,
                cwd=self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise RuntimeError(f"mlflow server exited with code {code}:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the server's whole process group: SIGTERM, then SIGKILL after ``timeout``."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        # Workers may outlive the leader for a moment; make sure none is left in the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log."""
        if not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A running ``mlflow server`` on 127.0.0.1, shared by the session and stopped at its end.

    Tests that call ``stop()`` must call ``start()`` again before they finish.
    """
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    try:
        server.start()
    except RuntimeError as err:
        pytest.fail(str(err), pytrace=False)
    try:
        yield server
    finally:
        server.stop()
