"""Stopping a run cleanly on SIGTERM (preemption) or Ctrl-C.

The first signal only asks the loop to stop after the step in flight, so the state that is
saved is a whole step's; a second Ctrl-C stops at once, as Python normally does.
"""

from __future__ import annotations

import signal
import threading


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
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user insists
        self.signum = signum

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
