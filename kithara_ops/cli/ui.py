"""``kithara-ops ui``: the MLflow UI on an experiment's chart comparison of its runs.

The page opened is a shared view of the runs page (see ``kithara_ops.tracking.view``): every
run's loss curve in one chart, the ``optimizer.*`` params that differ as table columns, and
with ``--run`` only one sweep's runs. For a local store (``sqlite://``, ``file://`` or a folder) it runs ``mlflow server`` on
127.0.0.1 until Ctrl-C or SIGTERM, then stops the server's whole process group. For a
tracking server (``http(s)://``) it only prints that server's URL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import unquote, urlparse

import typer

from kithara_ops.cli.app import app, fail, user_errors
from kithara_ops.errors import ConfigError, first_line
from kithara_ops.interrupt import handling_signals
from kithara_ops.ports import LOOPBACK, free_port, port_is_free

SOURCE = "Runs"
SERVER = "Server"
LISTED_EXPERIMENTS = 5
"""How many existing experiments an unknown-experiment error names."""
HOST = LOOPBACK


def comparison_url(uri: str, base: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI page (served at ``base``) comparing the runs of an experiment in ``uri``.

    Writes the page's view into the experiment (an MLflow shared view); where the store
    refuses that write, the plain chart page is returned and a warning says what is missing.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from kithara_ops.tracking.view import runs_url, share_comparison

    try:
        with _quick_http_failures():
            key = share_comparison(MlflowClient(uri), experiment_id, parent_run_id=run_id)
    except MlflowException as err:
        typer.echo(
            f"Warning: the comparison view could not be saved in the experiment "
            f"({first_line(err)}); the page shows MLflow's default columns.",
            err=True,
        )
        key = None
    return runs_url(base, experiment_id, key)


def _sweep_experiment(uri: str, run_id: str, name: str | None) -> str:
    """The experiment id of the sweep whose parent run is ``run_id``; ``ConfigError`` if none."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from kithara_ops.tracking.view import RUN_ID, children_filter

    if not RUN_ID.fullmatch(run_id):
        raise ConfigError(f"--run {run_id!r} is not an MLflow run id (letters, digits, - and _).")
    client = MlflowClient(uri)
    try:
        with _quick_http_failures():
            run = client.get_run(run_id)
            experiment = client.get_experiment(run.info.experiment_id)
            children = client.search_runs(
                [experiment.experiment_id],
                children_filter(run_id),
                max_results=1,
            )
    except MlflowException as err:
        raise ConfigError(f"Run {run_id!r} cannot be read from {uri}: {first_line(err)}") from None
    if name is not None and name != experiment.name:
        raise ConfigError(
            f"Run {run_id!r} is in experiment {experiment.name!r}, not {name!r}: drop --experiment."
        )
    if not children:
        raise ConfigError(
            f"Run {run_id!r} has no child runs: --run takes the parent run a sweep printed."
        )
    return str(experiment.experiment_id)


def _local_store_path(uri: str) -> Path | None:
    """The file or folder a local store URI names; ``None`` when ``uri`` is not local.

    ``sqlite:///rel.db`` and ``sqlite:////abs.db`` name files; ``file:///abs`` and plain paths
    name folders (MLflow's file store).
    """
    parsed = urlparse(uri)
    if uri.split(":")[0] in ("databricks", "databricks-uc", "uc"):
        return None
    if parsed.scheme == "sqlite":
        path = unquote(parsed.path)
        return Path(path[1:]) if path.startswith("/") else Path(path)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "":
        return Path(uri)
    return None


def _check_port(port: int) -> None:
    if not port_is_free(port, HOST):
        raise ConfigError(
            f"Port {port} on {HOST} is in use: choose another --port or leave it out."
        )


@contextlib.contextmanager
def _quick_http_failures() -> Iterator[None]:
    """A tracking server that does not answer fails the lookup in seconds, not minutes."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
    saved = {key: os.environ.get(key) for key in quick}
    os.environ.update({k: v for k, v in quick.items() if saved[k] is None})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


def _experiment_id(uri: str, name: str) -> str:
    """The id of the live experiment ``name`` in ``uri``; ``ConfigError`` if there is none."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from kithara_ops.tracking.experiments import experiment_state

    client = MlflowClient(uri)
    try:
        with _quick_http_failures():
            found, state = experiment_state(client, name)
            others = []
            if state != "active":
                listed = client.search_experiments(max_results=LISTED_EXPERIMENTS + 1)
                others = [e.name for e in listed if e.name != name]
    except MlflowException as err:
        detail = first_line(err, limit=None)
        raise ConfigError(f"Cannot read experiments from {uri}: {detail}") from None
    if found is not None and state == "active":
        return found
    what = "is deleted" if state == "deleted" else "does not exist"
    names = ", ".join(repr(n) for n in others[:LISTED_EXPERIMENTS])
    more = ", ..." if len(others) > LISTED_EXPERIMENTS else ""
    hint = f"existing: {names}{more}" if others else "it holds no other experiment"
    raise ConfigError(f"Experiment {name!r} {what} in {uri} ({hint}): pass --experiment NAME.")


class _Stop(BaseException):
    """Raised in the main thread by SIGINT or SIGTERM: stop the server and exit 0."""


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop(signum)


def _stop_group(server: Any, grace: float = 5.0) -> None:
    """Stop the server, then make sure nothing of its process group outlives it."""
    process = server.process
    if process is None:
        return
    server.stop()
    deadline = time.monotonic() + grace
    while True:  # the leader is gone; workers may take a moment longer
        try:
            os.killpg(process.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            return
        time.sleep(0.1)


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def _serve(uri: str, port: int | None, experiment_id: str, run_id: str | None) -> None:
    """Run ``mlflow server`` on ``uri`` until a signal; print its chart URL once it answers."""
    from kithara_ops.tracking.server import LocalServer

    with tempfile.TemporaryDirectory(prefix="kithara-ui-") as tmp:
        log_path = Path(tmp) / "server.log"
        server = LocalServer(backend_store_uri=uri, port=port, log_path=log_path)
        # What the signals fall back to once serving ends is SIG_IGN, so that a second
        # Ctrl-C waits for the server's process group to stop instead of leaving it running.
        with handling_signals(signal.SIG_IGN):
            try:
                # The server must start under a Python handler: a process started while
                # SIG_IGN is set inherits it, and may ignore the SIGTERM meant to stop it.
                with handling_signals(_raise_stop):
                    _run(server, uri, log_path, experiment_id, run_id)
            except _Stop:
                pass
            finally:
                _stop_group(server)


def _run(server: Any, uri: str, log_path: Path, experiment_id: str, run_id: str | None) -> None:
    """Start ``server``, print its chart URL and wait; exit 1 if it fails or stops by itself."""
    try:
        server.start()
    except RuntimeError as err:
        detail = _last_line(log_path)
        raise fail(f"{err}{' Last log line: ' + detail if detail else ''}", 1) from None
    typer.echo(f"MLflow UI: {comparison_url(uri, server.uri, experiment_id, run_id)}")
    sys.stdout.flush()
    typer.echo(f"Serving {uri} on {server.uri}; Ctrl-C to stop.", err=True)
    while server.process.poll() is None:
        time.sleep(0.5)
    detail = _last_line(log_path)
    raise fail(
        f"mlflow server exited with code {server.process.returncode}."
        + (f" Last log line: {detail}" if detail else ""),
        1,
    )


@app.command(
    epilog=(
        "Examples:\n\n"
        "  kithara-ops ui\n\n"
        "  kithara-ops ui --experiment sweep --port 5000\n\n"
        "  kithara-ops ui --run 0123456789abcdef0123456789abcdef\n\n"
        "  kithara-ops ui --tracking-uri sqlite:///runs/mlflow.db --print-url\n\n"
        "  kithara-ops ui --tracking-uri http://127.0.0.1:5000 --experiment sweep"
    )
)
@user_errors
def ui(
    experiment: Annotated[
        str | None,
        typer.Option(
            envvar="MLFLOW_EXPERIMENT_NAME",
            help="MLflow experiment to open. (default: kithara-ops)",
            rich_help_panel=SOURCE,
        ),
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            envvar="MLFLOW_TRACKING_URI",
            help="Store or server: sqlite:///mlflow.db, a folder, or http://host:port. "
            "(default: MLflow's, sqlite:///mlflow.db in the current directory)",
            rich_help_panel=SOURCE,
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65535,
            help="Port of the local server on 127.0.0.1. (default: a free port)",
            rich_help_panel=SERVER,
        ),
    ] = None,
    run: Annotated[
        str | None,
        typer.Option(
            "--run",
            help="Parent run of a sweep: show only its runs (its experiment is opened).",
            rich_help_panel=SOURCE,
        ),
    ] = None,
    print_url: Annotated[
        bool,
        typer.Option(
            "--print-url",
            help="Print the chart URL and exit without starting a server.",
            rich_help_panel=SERVER,
        ),
    ] = False,
) -> None:
    """Open the MLflow UI on an experiment's runs (or one sweep's), compared: every loss
    curve in one chart, the optimizer params that differ as columns."""
    import mlflow

    from kithara_ops.config.credentials import take_credentials
    from kithara_ops.tracking.experiments import DEFAULT_EXPERIMENT

    # The page's address is printed: a password in the URI goes to MLflow's variables.
    uri = take_credentials(tracking_uri or mlflow.get_tracking_uri())
    name = experiment or DEFAULT_EXPERIMENT

    def find_experiment() -> str:
        return _sweep_experiment(uri, run, experiment) if run else _experiment_id(uri, name)

    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        typer.echo(f"MLflow UI: {comparison_url(uri, uri, find_experiment(), run)}")
        return
    store = _local_store_path(uri)
    if store is None:
        raise ConfigError(
            f"Tracking URI {uri!r} is neither a local store (sqlite://, file:// or a folder) "
            "nor an http(s) server: start `mlflow server` for it and pass its URL."
        )
    if not store.exists():
        raise ConfigError(
            f"No MLflow store at {str(store)!r} (tracking URI {uri!r}): train a run first "
            "or pass --tracking-uri."
        )
    experiment_id = find_experiment()
    if print_url:
        base = f"http://{HOST}:{port or free_port(HOST)}"
        typer.echo(f"MLflow UI: {comparison_url(uri, base, experiment_id, run)}")
        return
    if port is not None:
        _check_port(port)
    _serve(uri, port, experiment_id, run)
