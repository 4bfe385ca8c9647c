"""Stopping a run whose loss or gradients stopped being finite, without a host sync per step.

The train step flags each step (``metrics["finite"]``); a tiny compiled function folds the
flags into three device counters after every step; the host reads them with the metrics at
logging steps and decides. With ``on_nonfinite="stop"`` the first non-finite step stops the
run at the next logging step; with ``"skip"`` the step changed nothing (see ``step``) and the
run stops only after ``nonfinite_patience`` such steps in a row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.jit
def _count(counters: jax.Array, finite: jax.Array) -> jax.Array:
    """``[streak, longest streak since the last read, total]`` after one more step."""
    bad = jnp.logical_not(finite).astype(jnp.int32)
    streak = (counters[0] + 1) * bad
    return jnp.stack([streak, jnp.maximum(counters[1], streak), counters[2] + bad])


class NonfiniteGuard:
    """Counts non-finite steps on the devices and tells the loop when to stop.

    Args:
      mode: ``"stop"`` or ``"skip"``.
      patience: with ``"skip"``, how many non-finite steps in a row stop the run.
    """

    def __init__(self, mode: str, patience: int):
        self.patience = 1 if mode == "stop" else patience
        self._counters = jnp.zeros(3, jnp.int32)
        self._placement = None  # the flag's sharding, which the counters take

    def _placed(self, counters) -> jax.Array:
        # Placed like the step's flag, so ``_count`` sees one signature and compiles once.
        return counters if self._placement is None else jax.device_put(counters, self._placement)

    def stepped(self, metrics: dict[str, jax.Array]) -> None:
        """Fold one step's flag into the counters (asynchronous: nothing waits)."""
        if self._placement is None:
            self._placement = metrics["finite"].sharding
            self._counters = self._placed(self._counters)
        self._counters = _count(self._counters, metrics["finite"])

    def read(self, logged: dict[str, float]) -> str | None:
        """At a logging step: add ``nonfinite_steps`` to ``logged``; the reason to stop, if any."""
        streak, longest, total = (int(v) for v in jax.device_get(self._counters))
        self._counters = self._placed(jnp.asarray([streak, streak, total], jnp.int32))
        logged.pop("finite", None)
        logged["nonfinite_steps"] = float(total)
        if longest < self.patience:
            return None
        seen = ", ".join(
            f"{name} {logged[name]}" for name in ("loss", "grad_norm") if name in logged
        )
        if self.patience == 1:
            return seen
        return f"{longest} non-finite steps in a row; {seen}"
