"""Pytest plugin: a private PostgreSQL cluster for the whole test session.

Load it with ``pytest_plugins = ["postgres_server"]`` and request the ``postgres_server``
fixture. The cluster is made afresh with ``initdb`` in a temporary folder, listens on 127.0.0.1
on a free port with its socket in that folder, trusts every local connection (it holds test
data only and is never reachable from another machine) and has an empty ``mlflow`` database.
It is stopped and its folder removed at the end of the session.

PostgreSQL refuses to run as root: as root, ``initdb`` and ``postgres`` run as the
``postgres`` system user that Debian's ``postgresql`` package creates. The binaries are
looked up in ``PATH``, then in ``/usr/lib/postgresql/<version>/bin`` (newest version first).
Without them the tests that need the cluster are skipped, or fail when ``CI`` is set.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kithara_ops.ports import free_port

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
SERVER_USER = "postgres"  # the system user of Debian's package, used when running as root
DATABASE = "mlflow"
REQUIRED = ("initdb", "postgres", "pg_isready", "createdb")


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries (or, as root, the ``postgres`` user) are missing."""


def _version_key(bindir: str) -> tuple[int, ...]:
    version = Path(bindir).parent.name  # /usr/lib/postgresql/<version>/bin
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def find_bindir() -> Path:
    """The folder holding ``initdb``, ``postgres``, ``pg_isready`` and ``createdb``.

    Raises:
        PostgresUnavailable: No folder in ``PATH`` or ``/usr/lib/postgresql/*/bin`` has them.
    """
    candidates = []
    initdb = shutil.which("initdb")
    if initdb is not None:
        candidates.append(str(Path(initdb).resolve().parent))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for folder in candidates:
        if all(os.access(Path(folder, name), os.X_OK) for name in REQUIRED):
            return Path(folder)
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, postgres) not found in PATH or "
        "/usr/lib/postgresql/*/bin"
    )


def _as_server_user() -> tuple[list[str], int | None, int | None]:
    """The command prefix and ids that run a command as a user PostgreSQL accepts.

    Not root: nothing to change. Root: ``setpriv`` (or ``runuser``) to the ``postgres`` user.
    """
    if os.geteuid() != 0:
        return [], None, None
    try:
        entry = pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise PostgresUnavailable(
            f"running as root and there is no {SERVER_USER!r} user to run PostgreSQL as"
        ) from None
    if shutil.which("setpriv"):
        prefix = ["setpriv", "--reuid", SERVER_USER, "--regid", str(entry.pw_gid)]
        prefix += ["--init-groups", "--"]
    elif shutil.which("runuser"):
        prefix = ["runuser", "-u", SERVER_USER, "--"]
    else:
        raise PostgresUnavailable("running as root and neither setpriv nor runuser is installed")
    return prefix, entry.pw_uid, entry.pw_gid


class PostgresServer:
    """A throw-away PostgreSQL cluster: its own data folder, port, socket folder and log.

    Attributes:
        root: The temporary folder holding ``data/``, ``socket/`` and ``postgres.log``.
        port: The TCP port on 127.0.0.1.
        uri: ``postgresql://postgres@127.0.0.1:<port>/mlflow``, a SQLAlchemy URI for MLflow.
        log_path: The server's combined stdout and stderr.
    """

    def __init__(self, bindir: Path, port: int | None = None) -> None:
        self.bindir = Path(bindir)
        self._prefix, self._uid, self._gid = _as_server_user()
        # Not under pytest's temporary folders: those are private to the user running pytest,
        # and the server may run as another user that must reach its data folder.
        self.root = Path(tempfile.mkdtemp(prefix="kithara-postgres-"))
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.socket_dir.mkdir(mode=0o700)
        if self._uid is not None:
            for folder in (self.root, self.socket_dir):
                os.chown(folder, self._uid, self._gid)
        self.log_path = self.root / "postgres.log"
        self.port = port or free_port()
        self.uri = f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"
        self._env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self._env.update(LC_ALL="C", LANG="C")
        self._proc: subprocess.Popen[bytes] | None = None

    def _run(self, *command: str, as_server_user: bool = False) -> None:
        prefix = self._prefix if as_server_user else []
        done = subprocess.run(
            [*prefix, *command],
            cwd=self.root,
            env=self._env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{Path(command[0]).name} exited with code {done.returncode}:\n"
                f"{done.stdout}{done.stderr}"
            )

    def _ready(self) -> bool:
        done = subprocess.run(
            [str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port),
             "-U", "postgres", "-d", "postgres", "-t", "1"],
            env=self._env,
            capture_output=True,
        )  # fmt: skip
        return done.returncode == 0

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Create the cluster, start the server, wait until it answers, create ``mlflow``.

        Raises:
            RuntimeError: A step failed or the server did not answer within ``timeout``
                seconds; the message ends with the tail of its log.
        """
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
            "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync",
            as_server_user=True,
        )  # fmt: skip
        command = [
            *self._prefix,
            str(self.bindir / "postgres"),
            "-D", str(self.data_dir),
            "-h", "127.0.0.1",
            "-p", str(self.port),
            "-k", str(self.socket_dir),
            # A test cluster: durability is not needed, speed is.
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                command,
                cwd=self.root,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise RuntimeError(f"postgres exited with code {code}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"postgres not ready after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)
        self._run(
            str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
            "-U", "postgres", DATABASE,
        )  # fmt: skip

    def create_database(self, name: str) -> str:
        """Create another database in the cluster; its URI (same user, host and port)."""
        self._run(
            str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
            "-U", "postgres", name,
        )  # fmt: skip
        return self.uri.rsplit("/", 1)[0] + f"/{name}"

    def _postmaster_pid(self) -> int | None:
        """The server's pid from ``postmaster.pid`` (the launcher's child when run as root)."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
        return None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the server (fast shutdown: SIGINT), then kill whatever is left of its group."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        pid = self._postmaster_pid() or proc.pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def cleanup(self) -> None:
        """Stop the server and remove its folder."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log."""
        if not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A running private PostgreSQL cluster with an empty ``mlflow`` database.

    Skipped when PostgreSQL is not installed, except under CI (``CI`` set), where it fails.
    """
    try:
        server = PostgresServer(find_bindir())
    except PostgresUnavailable as err:
        if os.environ.get("CI"):
            pytest.fail(f"{err} (CI installs Debian's postgresql package)", pytrace=False)
        pytest.skip(f"{err}: install Debian's postgresql package (apt-get install postgresql)")
    try:
        server.start()
    except (RuntimeError, subprocess.SubprocessError) as err:
        server.cleanup()
        pytest.fail(str(err), pytrace=False)
    try:
        yield server
    finally:
        server.cleanup()
