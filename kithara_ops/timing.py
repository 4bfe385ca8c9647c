"""When hooks run, how long steps take, and what the Trainer's loop carries between steps."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

from kithara_ops.callbacks import TrainResult
from kithara_ops.cost import StepCost, device_memory
from kithara_ops.guard import NonfiniteGuard
from kithara_ops.state import state_bytes
from kithara_ops.stopping import Bests, stop_reason


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


@dataclasses.dataclass
class Progress:
    """What the loop carries from step to step besides the state.

    Attributes:
      clock: step timing (and FLOP/s, MFU) since the run started.
      guard: the non-finite step counters.
      last_loss, eval_loss: the latest values (a restored run starts from its record's).
      placed: the placed state's ``total`` and ``per_device`` bytes (``state.state_bytes``).
      bests: the best losses so far and the early-stopping count (a restored run continues
        its record's).
      stop_reason: why the run ends before its last step (``stopping.stop_reason``), if it does.
      lower_step: after the first step, lowers the train step on that step's argument shapes.
    """

    clock: Clock
    guard: NonfiniteGuard
    last_loss: float | None
    eval_loss: float | None
    placed: dict[str, int]
    bests: Bests = dataclasses.field(default_factory=Bests)
    stop_reason: str | None = None
    first_step: int | None = None
    lower_step: Any = None

    def stepped(self, metrics: Any, step: int, train_step: Any, arguments: Any) -> None:
        """Note a dispatched step: its timing, its non-finite flag and, after the run's
        first step (whose lowering is cached by then), the step's FLOP count."""
        self.clock.stepped(metrics, step)
        if self.first_step is None:
            self.first_step = step
            shapes = jax.tree.map(_abstract, arguments)
            self.lower_step = lambda: train_step.lower(*shapes)
            if self.clock.cost is not None:
                self.clock.cost.analyse(self.lower_step)
        self.guard.stepped(metrics)

    def evaluated(self, step: int, eval_loss: float, config: Any) -> None:
        """Note an evaluation at ``step``: the latest ``eval_loss``, the bests, and whether
        ``config``'s early stopping ends the run here (``stop_reason``)."""
        self.eval_loss = eval_loss
        self.bests.saw_eval(step, eval_loss, config.early_stop_min_delta, config.target_eval_loss)
        self.stop_reason = stop_reason(
            self.bests, config.early_stop_patience, config.target_eval_loss
        )

    def result(self, step: int) -> TrainResult:
        """What ``train()`` returns at ``step``, the last."""
        return TrainResult(
            step, self.last_loss, self.eval_loss, self.clock.elapsed(),
            self.clock.compile_seconds, self.clock.last, state_bytes=self.placed,
            stop_reason=self.stop_reason,
        )  # fmt: skip

    @classmethod
    def at_start(cls, begin: Any, program: Any, shape: tuple[int, int], since: float) -> Progress:
        """The progress of a run starting at ``begin`` (a ``start.Start``) of ``program``,
        with batches of ``shape``, whose ``train()`` began at ``since``."""
        placed = state_bytes(begin.state)
        tokens = shape[0] * shape[1]
        weights = int(sum(np.prod(v.shape, dtype=np.int64) for v in program.model.weights))
        cost = StepCost(weights, tokens, program.mesh.devices.flat)
        # The state's size is measured, not configured (and differs by optimizer): a metric.
        sizes = {"state_bytes": placed["total"], "state_bytes_per_device": placed["per_device"]}
        record, config = begin.record, program.config
        return cls(
            Clock(tokens_per_step=tokens, since=since, cost=cost, once=sizes),
            NonfiniteGuard(config.on_nonfinite, config.nonfinite_patience),
            record.loss if record else None,
            record.eval_loss if record else None,
            placed,
            Bests.from_json(record.bests if record else None, config.target_eval_loss),
        )


def _abstract(array: jax.Array) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=array.sharding)
