"""What an optimizer's own bookkeeping says, as step metrics computed on the devices.

- ``clipped``: 1.0 when the optimizer's clipping acted on this step's raw gradient ``g``:
  ``‖g‖₂ > c`` for global-norm clipping (``optax.clip_by_global_norm``, Keras
  ``global_clipnorm``), ``maxᵢ ‖gᵢ‖₂ > c`` for per-tensor clipping (Keras ``clipnorm``,
  ``optax.clip_by_block_rms`` style), ``maxⱼ |gⱼ| > c`` for value clipping (``optax.clip``,
  Keras ``clipvalue``). It assumes the clipping sees the raw gradient, as it does when it
  comes first in a chain.
- Optax's monitoring wrappers keep counters in their state; they are read from it:
  ``optax.notfinite_count``, ``optax.total_notfinite`` and ``optax.last_finite``
  (``apply_if_finite``), ``optax.mini_step`` and ``optax.gradient_step`` (``MultiSteps``),
  and ``optax.hyperparams.<name>`` for each scalar ``inject_hyperparams`` keeps. A second
  wrapper of one kind gets the suffix ``.2``, and so on.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def clipped(grads: Any, grad_norm: jax.Array, clipping: dict | None) -> jax.Array | None:
    """Whether ``clipping`` (a description's ``{"kind", "value"}``) acted on ``grads``."""
    if not clipping or clipping.get("value") is None:
        return None
    limit = jnp.float32(clipping["value"])
    leaves = jax.tree.leaves(grads)
    if clipping["kind"] == "global_norm":
        acted = grad_norm > limit
    elif clipping["kind"] == "norm":
        acted = jnp.any(jnp.stack([jnp.linalg.norm(g.astype(jnp.float32)) for g in leaves]) > limit)
    elif clipping["kind"] == "value":
        acted = jnp.any(jnp.stack([jnp.max(jnp.abs(g)) for g in leaves]) > limit)
    else:
        return None
    return acted.astype(jnp.float32)


_COUNTERS = {
    optax.ApplyIfFiniteState: ("notfinite_count", "total_notfinite", "last_finite"),
    optax.MultiStepsState: ("mini_step", "gradient_step"),
}


# inject_hyperparams' state class, by the names Optax releases have given it.
_INJECTED = tuple(
    getattr(optax, name)
    for name in ("InjectHyperparamsState", "InjectStatefulHyperparamsState")
    if hasattr(optax, name)
)


def _is_monitored(node: Any) -> bool:
    return isinstance(node, (*_COUNTERS, *_INJECTED))


def state_monitors(opt_state: Any) -> dict[str, jax.Array]:
    """The monitoring wrappers' scalars in ``opt_state``, by the names the module lists."""
    found: dict[str, jax.Array] = {}

    def put(name: str, value: Any) -> None:
        key, n = f"optax.{name}", 2
        while key in found:
            key, n = f"optax.{name}.{n}", n + 1
        found[key] = jnp.asarray(value, jnp.float32)

    def visit(tree: Any) -> None:
        if not _is_monitored(tree):
            for node in jax.tree.leaves(tree, is_leaf=lambda x: x is not tree and _is_monitored(x)):
                if _is_monitored(node):
                    visit(node)
            return
        if isinstance(tree, _INJECTED):
            for name, value in tree.hyperparams.items():
                if jnp.ndim(value) == 0 and jnp.issubdtype(jnp.result_type(value), jnp.number):
                    put(f"hyperparams.{name}", value)
        else:
            for field in _COUNTERS[type(tree)]:
                put(field, getattr(tree, field))
        # Wrappers wrap: their inner state may hold more of them.
        for field in tree._fields:
            if field not in _COUNTERS.get(type(tree), ()) and field != "hyperparams":
                visit(getattr(tree, field))

    visit(opt_state)
    return found
