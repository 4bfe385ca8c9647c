"""What libraries print on their own when something fails, kept off a user's terminal.

When a checkpoint cannot be written, Orbax logs the failure from each of its threads with a
traceback, and TensorStore's late callbacks into Orbax's closed event loop print one
traceback each; a read-only MLflow store logs a traceback per statement: hundreds of lines
for one fault that kithara-ops reports in one line. The
CLI hides them unless ``--debug`` is given; the Python API leaves logging to its caller.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import sys

# Orbax logs through absl's logger, and its failed writes' futures through asyncio's ("never
# retrieved"); MLflow's SQL store logs each failed statement with its traceback. (A logger's filters see only its own records, hence the full names.)
_LIBRARY_LOGGERS = ("absl", "asyncio", "mlflow.store.db.utils")


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


@contextlib.contextmanager
def _stderr_discarded():
    """Point file descriptor 2 at /dev/null meanwhile: C++ logs bypass ``sys.stderr``."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Imports TensorFlow (which KerasHub's tokenizers run on) with its start-up log lines
    (CUDA probing, oneDNN notices: six lines from C++, before any Python logging) hidden."""

    def __init__(self) -> None:
        self._finding = False

    def find_spec(self, name, path=None, target=None):
        # Libraries probe for TensorFlow (``importlib.util.find_spec``) without importing it:
        # this finder stays until an import really runs, and wraps each spec it hands out.
        if name != "tensorflow" or self._finding:
            return None
        self._finding = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._finding = False
        if spec is not None and spec.loader is not None:
            run = spec.loader.exec_module

            def exec_module(module):
                with contextlib.suppress(ValueError):
                    sys.meta_path.remove(self)
                with _stderr_discarded():
                    run(module)

            spec.loader.exec_module = exec_module
        return spec


def quiet_libraries() -> None:
    """Hide libraries' own error logs, closed-event-loop tracebacks and TensorFlow's start-up
    lines for this process."""
    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropErrors) for f in logger.filters):
            logger.addFilter(_DropErrors())
    sys.unraisablehook = _quiet_unraisable
    if "tensorflow" not in sys.modules and not any(
        isinstance(finder, _QuietTensorFlowImport) for finder in sys.meta_path
    ):
        sys.meta_path.insert(0, _QuietTensorFlowImport())
