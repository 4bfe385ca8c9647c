"""The shared helpers: one-line errors, signal handling, experiment look-ups, free ports."""

from __future__ import annotations

import os
import signal
import socket
import threading

import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from kithara_ops.errors import first_line
from kithara_ops.interrupt import StopRequests, handling_signals
from kithara_ops.ports import free_port, port_is_free
from kithara_ops.tracking import params
from kithara_ops.tracking.experiments import experiment_id, experiment_state


@pytest.mark.parametrize(
    ("err", "expected"),
    [
        (ValueError("bad value\nTraceback (most recent call last):\n  ..."), "bad value"),
        (RuntimeError("\n\n   server down  \n details"), "server down"),
        (KeyError(), "KeyError"),
        (OSError("  \n \t\n"), "OSError"),
        (KeyboardInterrupt(), "KeyboardInterrupt"),
        # SQLAlchemy's note on how the error surfaced comes before the database's own error.
        (
            RuntimeError(
                "(raised as a result of Query-invoked autoflush; consider using a "
                "session.no_autoflush block)\n(sqlite3.OperationalError) database or disk is "
                "full\n[SQL: INSERT ...]"
            ),
            "(sqlite3.OperationalError) database or disk is full",
        ),
    ],
)
def test_first_line_is_the_first_non_empty_line_or_the_type_name(err, expected):
    assert first_line(err) == expected


def test_first_line_is_cut_to_the_limit():
    err = ValueError("x" * 500 + "\nmore")
    assert first_line(err) == "x" * 200
    assert first_line(err, limit=10) == "x" * 10
    assert first_line(err, limit=None) == "x" * 500


@pytest.fixture
def client(tmp_path):
    return MlflowClient(f"sqlite:///{tmp_path}/m.db")


def test_experiment_id_finds_and_creates_only_when_asked(client):
    assert experiment_id(client, "absent") is None
    assert experiment_state(client, "absent") == (None, "missing")
    assert client.get_experiment_by_name("absent") is None

    created = experiment_id(client, "new", create=True)
    assert isinstance(created, str)
    assert client.get_experiment(created).tags.items() >= params.EXPERIMENT_TAGS.items()
    assert experiment_id(client, "new", create=True) == created
    assert experiment_id(client, "new") == created
    assert experiment_state(client, "new") == (created, "active")


def test_an_experiment_another_process_creates_first_is_used(client, monkeypatch):
    """Between this process's look-up and its create, another process created it."""
    from mlflow.exceptions import MlflowException

    create = client.create_experiment

    def raced(name, tags=None):
        other = create(name)  # the other process wins
        raise MlflowException(f"RESOURCE_ALREADY_EXISTS: Experiment(name={name}) ({other})")

    monkeypatch.setattr(client, "create_experiment", raced)
    won = client.get_experiment_by_name
    assert experiment_id(client, "shared", create=True) == won("shared").experiment_id
    monkeypatch.setattr(client, "create_experiment", lambda *a, **k: (_ for _ in ()).throw(
        MlflowException("the store is read-only")))  # fmt: skip
    with pytest.raises(MlflowException, match="read-only"):
        experiment_id(client, "other", create=True)


def test_a_deleted_experiment_is_found_never_recreated(client):
    deleted = client.create_experiment("gone")
    client.delete_experiment(deleted)
    assert experiment_state(client, "gone") == (deleted, "deleted")
    assert experiment_id(client, "gone", create=True) == deleted
    assert (
        len(client.search_experiments(view_type=ViewType.ALL, filter_string="name = 'gone'")) == 1
    )


def test_free_port_can_be_listened_on():
    port = free_port()
    assert 1024 <= port <= 65535
    assert port_is_free(port)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", port))
        server.listen()
        assert not port_is_free(port)


def _previous_handler(signum, frame):
    raise AssertionError("the handler under test should have run instead")


@pytest.fixture
def sigusr():
    """SIGUSR1 and SIGUSR2 with a known handler, put back as they were after the test."""
    signals = (signal.SIGUSR1, signal.SIGUSR2)
    saved = {signum: signal.signal(signum, _previous_handler) for signum in signals}
    yield signals
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_handling_signals_handles_then_restores_the_previous_handlers(sigusr):
    received = []
    with handling_signals(lambda signum, frame: received.append(signum), sigusr) as installed:
        assert installed
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)
    assert sorted(received) == sorted(sigusr)
    assert all(signal.getsignal(signum) is _previous_handler for signum in sigusr)


def test_handling_signals_restores_the_previous_handlers_on_an_exception(sigusr):
    with pytest.raises(RuntimeError), handling_signals(signal.SIG_IGN, sigusr):
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
        raise RuntimeError
    assert all(signal.getsignal(signum) is _previous_handler for signum in sigusr)


def test_handling_signals_is_a_no_op_off_the_main_thread(sigusr):
    seen = {}

    def worker():
        with handling_signals(signal.SIG_IGN, sigusr) as installed:
            seen["installed"] = installed
            seen["handlers"] = [signal.getsignal(signum) for signum in sigusr]

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == {"installed": False, "handlers": [_previous_handler, _previous_handler]}


def test_stop_requests_take_the_first_signal_and_a_second_ctrl_c_interrupts():
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    with StopRequests() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert {signum: signal.getsignal(signum) for signum in before} == before


def test_mlflow_limits_are_mlflow_s_own():
    from mlflow.utils import validation

    assert params.MAX_PARAM_LENGTH == validation.MAX_PARAM_VAL_LENGTH
    assert params.MAX_TAG_LENGTH == validation.MAX_TAG_VAL_LENGTH
    assert params.MAX_METRICS_PER_BATCH == validation.MAX_METRICS_PER_BATCH
    assert params.MAX_PARAMS_PER_BATCH == validation.MAX_PARAMS_TAGS_PER_BATCH
    assert params._mlflow_limit("NO_SUCH_LIMIT", 42) == 42
