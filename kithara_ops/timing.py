"""When hooks run, and how long steps take, for the Trainer's loop."""

from __future__ import annotations

import time
from typing import Any

import jax

from kithara_ops.cost import StepCost, device_memory


def every(n: int | None, step: int, total: int, only_last: bool = False) -> bool:
    """Whether a hook with period ``n`` runs at ``step``: every ``n`` steps and at the last.

    ``n=None`` runs only at the last step with ``only_last``, and never otherwise.
    """
    if step == total:
        return n is not None or only_last
    return bool(n) and step % n == 0


class Clock:
    """Step timing: compilation apart from steady speed, and speed between logging steps;
    with a ``StepCost``, FLOP/s, MFU and device memory beside them.

    The first step's time includes compilation, so the clock blocks on it once; after that
    it reads the time only when metrics are fetched, which syncs with the devices anyway.
    """

    def __init__(
        self,
        tokens_per_step: int,
        since: float,
        cost: StepCost | None = None,
        once: dict[str, float] | None = None,
    ):
        self.once = dict(once or {})  # reported at the first logging step, with compilation
        self.tokens_per_step = tokens_per_step
        self.started = since
        self.cost = cost
        self.compile_seconds = 0.0
        self.last: dict[str, float] = {}
        self._mark, self._mark_step = time.perf_counter(), None
        self._compile_reported = False

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
        if self.cost is not None:
            values.update(self.cost.metrics(values.get("step_time_seconds")))
            values.update(device_memory())
        if not self._compile_reported:  # once: it is the first step's
            values["compile_seconds"], self._compile_reported = self.compile_seconds, True
            values.update(self.once)
        self._mark, self._mark_step = time.perf_counter(), step
        self.last = values
        return values

    def elapsed(self) -> float:
        """Seconds since ``train()`` started."""
        return time.perf_counter() - self.started
