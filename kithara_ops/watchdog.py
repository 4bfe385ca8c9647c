"""A watchdog for hung steps: a run that stops making progress ends, visibly, with its own
exit code, instead of waiting forever on a stuck collective, a dead host or stuck data.

The watchdog is a sink that hears every event of the loop. After the first step (which
compiles, and may restore) it expects an event at least every ``timeout`` seconds. When none
comes it prints one line, tells the other sinks (``Callback.on_hang``: the tracker marks the
MLflow run FAILED with ``stop_reason=hang`` and the last step, within a bounded time), and
ends the process with ``EXIT_HANG``. Nothing new is saved: the state may be mid-update; the
newest complete checkpoint is where a resume starts. In a multi-process run every process
has its own watchdog, so a hang that stops one stops them all.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

from kithara_ops.callbacks import Callback

EXIT_HANG = 75
"""The exit code of a run ended as hung (``EX_TEMPFAIL``: worth retrying, e.g. on a new host)."""
HANG = "hang"
"""``stop_reason`` of a run ended by the watchdog."""


class Watchdog(Callback):
    """Ends the process when no step finishes for ``timeout`` seconds.

    Args:
      timeout: seconds allowed between two events of the loop, after the first step.
      notify: called with ``(last_step, seconds)`` when the run hangs (the other sinks'
        ``on_hang``); given ``grace`` seconds before the process ends regardless.
      grace: the most the sinks are waited for.
      end: how the process ends (``os._exit``: the main thread may be stuck in native code).
    """

    def __init__(self, timeout: float, notify: Callable[[int, float], None] = lambda *_: None,
                 grace: float = 15.0, end: Callable[[int], None] = os._exit):  # fmt: skip
        self.timeout, self.notify, self.grace, self.end = timeout, notify, grace, end
        self._last: float | None = None  # armed by the first step
        self._step = 0
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def on_train_start(self, run) -> None:
        self._thread = threading.Thread(target=self._watch, name="kithara-watchdog", daemon=True)
        self._thread.start()

    def _fed(self) -> None:
        if self._last is not None:
            self._last = time.monotonic()

    def on_step(self, record) -> None:
        self._step, self._last = record.step, time.monotonic()

    def on_log(self, step, metrics) -> None:
        self._fed()

    def on_eval(self, step, metrics) -> None:
        self._fed()

    def on_checkpoint(self, step, path) -> None:
        self._fed()

    def on_train_end(self, status, result) -> None:
        self._done.set()

    def _watch(self) -> None:
        poll = min(1.0, self.timeout / 4)
        while not self._done.wait(poll):
            last = self._last
            if last is not None and time.monotonic() - last > self.timeout:
                self._hung(time.monotonic() - last)
                return

    def _hung(self, seconds: float) -> None:
        step = self._step
        print(
            f"Error: no step finished in {seconds:.0f} s (timeout {self.timeout:g} s) after step "
            f"{step}: the run is ended as hung (exit {EXIT_HANG}); resume from its newest "
            "checkpoint.",
            file=sys.stderr,
            flush=True,
        )
        telling = threading.Thread(target=self.notify, args=(step, seconds), daemon=True)
        telling.start()
        telling.join(self.grace)
        sys.stdout.flush()
        self.end(EXIT_HANG)
