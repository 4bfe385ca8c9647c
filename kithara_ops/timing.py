"""When hooks run, and how long steps take, for the Trainer's loop."""

from __future__ import annotations

import time
from typing import Any

import jax


def every(n: int | None, step: int, total: int, only_last: bool = False) -> bool:
    """Whether a hook with period ``n`` runs at ``step``: every ``n`` steps and at the last.

    ``n=None`` runs only at the last step with ``only_last``, and never otherwise.
    """
    if step == total:
        return n is not None or only_last
    return bool(n) and step % n == 0


class Clock:
    """Step timing: compilation apart from steady speed, and speed between logging steps.

    The first step's time includes compilation, so the clock blocks on it once; after that
    it reads the time only when metrics are fetched, which syncs with the devices anyway.
    """

    def __init__(self, tokens_per_step: int, since: float):
        self.tokens_per_step = tokens_per_step
        self.started = since
        self.compile_seconds = 0.0
        self.last: dict[str, float] = {}
        self._mark, self._mark_step = time.perf_counter(), None

    def stepped(self, metrics: Any, step: int) -> None:
        """Note a dispatched step; times the first one (compilation) to its end."""
        if self._mark_step is None:
            jax.block_until_ready(metrics)
            self.compile_seconds = time.perf_counter() - self._mark
            self._mark, self._mark_step = time.perf_counter(), step

    def host_metrics(self, metrics: Any, step: int) -> dict[str, float]:
        """Fetch one step's metrics (the only host sync of a logging interval), add speed."""
        values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "tokens"}
        steps, elapsed = step - self._mark_step, time.perf_counter() - self._mark
        if steps > 0 and elapsed > 0:
            values["step_time_seconds"] = elapsed / steps
            values["tokens_per_second"] = self.tokens_per_step * steps / elapsed
        self._mark, self._mark_step = time.perf_counter(), step
        self.last = values
        return values

    def elapsed(self) -> float:
        """Seconds since ``train()`` started."""
        return time.perf_counter() - self.started
