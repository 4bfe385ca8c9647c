"""Stopping a run cleanly on SIGTERM (preemption) or Ctrl-C.

The first signal only asks the loop to stop after the step in flight, so the state that is
saved is a whole step's; a second Ctrl-C stops at once, as Python normally does.

``handling_signals`` is how kithara-ops installs signal handlers anywhere (training here,
``launch`` and ``ui`` on the command line): only from the main thread, and always putting the
previous handlers back.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from types import FrameType
from typing import Any


@contextlib.contextmanager
def handling_signals(
    handler: Callable[[int, FrameType | None], Any] | int,
    signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM),
) -> Iterator[bool]:
    """While active, ``handler`` handles ``signals``; on exit the previous handlers are back.

    Python lets only the main thread install handlers; in any other thread this does nothing
    and signals behave as usual, so code that may run in a thread (a Trainer in a notebook's
    worker, a test runner) needs no check of its own.

    Args:
      handler: a function of ``(signum, frame)``, ``signal.SIG_IGN`` or ``signal.SIG_DFL``.
      signals: the signals to handle.

    Yields:
      Whether the handler was installed (``False`` off the main thread).
    """
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous: dict[int, Any] = {}
    try:
        for signum in signals:
            previous[signum] = signal.signal(signum, handler)
        yield True
    finally:
        for signum, old in previous.items():
            # None: the previous handler was not set from Python and cannot be put back;
            # the default is the nearest thing that can.
            signal.signal(signum, signal.SIG_DFL if old is None else old)


class TrainingStopped(KeyboardInterrupt):
    """Raised by ``Trainer.train()`` after a clean stop on a signal (the state was saved).

    A ``KeyboardInterrupt``, so code that handles Ctrl-C handles it too.

    Attributes:
      signum: the signal that stopped the run (``signal.SIGINT`` or ``signal.SIGTERM``).
      step: the last step trained (and saved, when the run checkpoints).
    """

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.signum = signum
        self.step = step


class StopRequests:
    """While active, SIGTERM and the first SIGINT set ``signum`` instead of interrupting.

    Signal handlers can only be installed from the main thread; elsewhere this does nothing
    and signals behave as usual.
    """

    def __init__(self):
        self.signum: int | None = None
        self._handling: contextlib.AbstractContextManager[bool] | None = None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user insists
        self.signum = signum

    def __enter__(self) -> StopRequests:
        self._handling = handling_signals(self._handle, (signal.SIGTERM, signal.SIGINT))
        self._handling.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._handling is not None:
            handling, self._handling = self._handling, None
            handling.__exit__(*exc)


class CancelOnSignal:
    """While active, the first SIGTERM or SIGINT sets ``event`` so a wait can end at once.

    For waits that may outlast a user's patience or a scheduler's grace period (the end of a
    run waiting for a tracking server): the first signal records ``signum`` and sets
    ``event``, which the waiting code checks; a second Ctrl-C raises ``KeyboardInterrupt``, as
    ``StopRequests`` does. Off the main thread this does nothing and signals behave as usual.

    Attributes:
      event: set by the first signal.
      signum: that signal's number, ``None`` while no signal came.
      active: whether the handlers are installed (only from the main thread).
    """

    def __init__(self):
        self.event = threading.Event()
        self.signum: int | None = None
        self.active = False
        self._handling: contextlib.AbstractContextManager[bool] | None = None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user insists
        if self.signum is None:
            self.signum = signum
        self.event.set()

    def __enter__(self) -> CancelOnSignal:
        self._handling = handling_signals(self._handle, (signal.SIGTERM, signal.SIGINT))
        self.active = self._handling.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._handling is not None:
            handling, self._handling = self._handling, None
            handling.__exit__(*exc)
