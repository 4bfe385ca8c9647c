"""Telling MLflow errors that will pass (an outage) from errors that never will (a refusal).

An outage (connection refused, a timeout, a 5xx, a locked database) is retried until the
server answers again. A refusal is final: MLflow said no to this record (an invalid value, a
param changed on a resumed run), or to the whole run (an experiment name over MLflow's
limit, a deleted run, a store that cannot be opened or written). Retrying a refusal would
only repeat it for the rest of the run.
"""

from __future__ import annotations

from urllib.parse import urlparse

PERMANENT_CODES = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_DOES_NOT_EXIST",
        "RESOURCE_ALREADY_EXISTS",
        "INVALID_STATE",
        "BAD_REQUEST",
        "ENDPOINT_NOT_FOUND",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
    }
)
"""MLflow error codes that the same request will get again, however long it waits."""

# SQLite reports these as operational errors (which MLflow calls temporarily unavailable),
# but a read-only file, a full disk or a path that cannot be opened stays so for the run.
_PERMANENT_STORE_MESSAGES = (
    "readonly database",
    "database or disk is full",
    "unable to open database file",
)

# Refusals that concern the run rather than one record: every later record would be
# refused the same way.
_RUN_GONE_MESSAGES = ("must be in the 'active' state",)


class RunRefused(Exception):
    """MLflow will not take this run at all (it was deleted, or cannot be created)."""


def is_local_store(tracking_uri: str) -> bool:
    """Whether the store is a file on this machine (``sqlite:``, ``file:`` or a plain path)."""
    return urlparse(tracking_uri).scheme in ("", "file", "sqlite")


def is_permanent(err: BaseException) -> bool:
    """Whether ``err`` is a refusal that retrying cannot change (see the module docstring)."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, RunRefused):
        return True
    text = str(err)
    if any(message in text for message in _PERMANENT_STORE_MESSAGES):
        return True
    return isinstance(err, MlflowException) and err.error_code in PERMANENT_CODES


def is_store_fault(err: BaseException) -> bool:
    """Whether ``err`` says the store itself cannot be written (read-only, full, unopenable)."""
    return any(message in str(err) for message in _PERMANENT_STORE_MESSAGES)


def refuses_run(err: BaseException) -> bool:
    """Whether a refused record means the run itself is gone (deleted, or never existed)."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, RunRefused) or any(m in str(err) for m in _RUN_GONE_MESSAGES):
        return True
    text = str(err)
    if any(message in text for message in _PERMANENT_STORE_MESSAGES):
        return True
    return isinstance(err, MlflowException) and err.error_code == "RESOURCE_DOES_NOT_EXIST"
