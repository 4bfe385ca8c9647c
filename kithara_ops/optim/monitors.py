r"""What an optimizer's own bookkeeping says, as step metrics computed on the devices.

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
- ``optim.d``: the step size a learning-rate-free method estimates, after this step. For
  ``optax.contrib.prodigy`` and ``dadapt_adamw`` it is the distance estimate :math:`d_t`
  (their ``estim_lr``), so the step taken is :math:`\eta_t d_t` times the normalised Adam
  direction, :math:`\eta_t` being the configured ``learning_rate``; for
  ``optax.contrib.mechanize`` it is the learned scale :math:`\sum_i s_i` that multiplies the
  base optimizer's accumulated updates.
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


def _step_size_kinds() -> dict[type, Any]:
    """State classes of learning-rate-free methods -> how to read their step size."""
    readers = {
        "ProdigyState": lambda state: state.estim_lr,
        "DAdaptAdamWState": lambda state: state.estim_lr,
        "MechanicState": lambda state: jnp.sum(state.s),
    }
    contrib = getattr(optax, "contrib", None)
    return {
        getattr(contrib, name): read for name, read in readers.items() if hasattr(contrib, name)
    }


_STEP_SIZE = _step_size_kinds()


# inject_hyperparams' state class, by the names Optax releases have given it.
_INJECTED = tuple(
    getattr(optax, name)
    for name in ("InjectHyperparamsState", "InjectStatefulHyperparamsState")
    if hasattr(optax, name)
)


def _is_monitored(node: Any) -> bool:
    return isinstance(node, (*_COUNTERS, *_INJECTED, *_STEP_SIZE))


def state_monitors(opt_state: Any) -> dict[str, jax.Array]:
    """The monitoring wrappers' scalars in ``opt_state``, by the names the module lists."""
    found: dict[str, jax.Array] = {}

    def put(name: str, value: Any) -> None:
        name = name if name.startswith("optim.") else f"optax.{name}"
        key, n = name, 2
        while key in found:
            key, n = f"{name}.{n}", n + 1
        found[key] = jnp.asarray(value, jnp.float32)

    def visit(tree: Any) -> None:
        if not _is_monitored(tree):
            for node in jax.tree.leaves(tree, is_leaf=lambda x: x is not tree and _is_monitored(x)):
                if _is_monitored(node):
                    visit(node)
            return
        if type(tree) in _STEP_SIZE:
            put("optim.d", _STEP_SIZE[type(tree)](tree))
        elif isinstance(tree, _INJECTED):
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


_PROBE = {
    "dense/kernel": jax.ShapeDtypeStruct((8, 8), jnp.float32),
    "dense/bias": jax.ShapeDtypeStruct((8,), jnp.float32),
    "token_embedding/embeddings": jax.ShapeDtypeStruct((16, 8), jnp.float32),
}
"""A small stand-in parameter tree, to learn an Optax state's structure without a model."""


def optimizer_metrics(optimizer: Any, clipping: dict | None) -> list[str]:
    """The step metrics this module adds for ``optimizer``, beside those every run logs.

    ``clipped`` where the description has a clipping threshold; for an Optax
    transformation, the names ``state_monitors`` finds in its state, learnt from an abstract
    state of a stand-in parameter tree (nothing is computed). A transformation whose state
    depends on the real parameters' paths (labels, masks) may add names this cannot see.
    """
    names = ["clipped"] if clipping and clipping.get("value") is not None else []
    if isinstance(optimizer, optax.GradientTransformation):
        try:
            state = jax.eval_shape(optimizer.init, _PROBE)
            names += list(jax.eval_shape(state_monitors, state))
        except Exception:  # labels or masks that need the model's own paths
            pass
    return names
