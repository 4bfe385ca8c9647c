"""What libraries print on their own when something fails, kept off a user's terminal.

When a checkpoint cannot be written, Orbax logs the failure from each of its threads with a
traceback, and TensorStore's late callbacks into Orbax's closed event loop print one
traceback each; a read-only MLflow store logs a traceback per statement: hundreds of lines
for one fault that kithara-ops reports in one line. The
CLI hides them unless ``--debug`` is given; the Python API leaves logging to its caller.
"""

from __future__ import annotations

import logging
import sys

# Orbax logs through absl's logger; MLflow's SQL store logs each failed statement with its
# traceback. (A logger's filters see only its own records, hence the full names.)
_LIBRARY_LOGGERS = ("absl", "mlflow.store.db.utils")


class _DropErrors(logging.Filter):
    """Drops error records (the failure they describe is raised and reported once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def _quiet_unraisable(unraisable) -> None:
    # A callback into an asyncio loop that has already closed: the operation it belonged
    # to has failed or finished, and its own outcome is reported where it was awaited.
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
        return
    sys.__unraisablehook__(unraisable)


def quiet_libraries() -> None:
    """Hide libraries' own error logs and closed-event-loop tracebacks for this process."""
    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropErrors) for f in logger.filters):
            logger.addFilter(_DropErrors())
    sys.unraisablehook = _quiet_unraisable
