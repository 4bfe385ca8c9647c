"""Optax transformations, applied as the pure functions they are."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from kithara_ops.optim.adapter import Params, Shardings
from kithara_ops.optim.introspect import find_learning_rate, walk


class OptaxAdapter:
    """Adapter for an ``optax.GradientTransformation`` (or ``MultiSteps``).

    The optimizer state is Optax's own state pytree. The learning rate reported for a step is
    read, in this order, from ``inject_hyperparams`` state (the value the update used), from a
    schedule evaluated at the state's update count, or from a constant learning rate; it is
    NaN when none of these is present (a custom transformation).
    """

    family = "optax"
    init_on_host = False

    def __init__(self, tx: optax.GradientTransformation, user_object: Any = None):
        self.optimizer = user_object if user_object is not None else tx
        self._tx = tx
        self._extra_args = isinstance(tx, optax.GradientTransformationExtraArgs)
        self._learning_rate = find_learning_rate(walk(tx))

    def init(self, params: Params) -> Any:
        """``tx.init(params)``."""
        return self._tx.init(params)

    def update(self, grads: Params, opt_state: Any, params: Params, loss: jax.Array):
        """``tx.update`` then ``optax.apply_updates``; the loss goes to transforms that take it."""
        extra = {"value": loss} if self._extra_args else {}
        updates, new_state = self._tx.update(grads, opt_state, params, **extra)
        new_params = optax.apply_updates(params, updates)
        return new_params, new_state, self._learning_rate_used(opt_state, new_state)

    def _learning_rate_used(self, old_state: Any, new_state: Any) -> jax.Array:
        # inject_hyperparams stores the values it just used in the new state.
        injected = optax.tree_utils.tree_get_all_with_path(new_state, "learning_rate")
        if injected:
            return jnp.asarray(injected[0][1], jnp.float32)
        lr = self._learning_rate
        if callable(lr):
            counts = optax.tree_utils.tree_get_all_with_path(old_state, "count")
            if counts:
                return jnp.asarray(lr(counts[0][1]), jnp.float32)
            return jnp.float32(jnp.nan)
        if lr is None:
            return jnp.float32(jnp.nan)
        return jnp.float32(lr)

    state_keys = None
    """Optax states have a fixed structure: restored by path, not by position."""

    variables: tuple = ()
    """An Optax transformation holds no variables: its state lives in the train state only."""

    def write_back(self, opt_state: Any) -> None:
        """Nothing to do: an Optax transformation keeps no state of its own."""
        del opt_state

    def state_shardings(self, abstract_state, param_shardings: Shardings, replicated):
        """Per-parameter leaves (moments, traces) follow their parameter; the rest replicate."""
        return optax.tree_map_params(
            self._tx,
            lambda _, sharding: sharding,
            abstract_state,
            param_shardings,
            transform_non_params=lambda _: replicated,
            is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
        )
