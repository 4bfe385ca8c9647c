"""Keras optimizers, applied statelessly inside the jit-compiled step.

Keras 3 optimizers can run without touching their variables: ``stateless_apply`` takes the
optimizer variables' values, the gradients and the parameters, and returns new values. The
optimizer object is only used for its maths (update rule, clipping, weight decay, schedule);
its state lives in the train state like everything else.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import keras

from kithara_ops.optim import placement
from kithara_ops.optim.adapter import Params, Shardings
from kithara_ops.state import variable_keys


def _learning_rate(optimizer: keras.optimizers.Optimizer) -> jax.Array:
    """The optimizer's current learning rate; for a ``MultiOptimizer``, which has none of its
    own, that of its first inner optimizer (``optimizer.optimizers[0]``)."""
    inner = getattr(optimizer, "optimizers", None)
    if inner:
        return _learning_rate(inner[0])
    try:
        value = optimizer.learning_rate
    except AttributeError:
        return jnp.float32(jnp.nan)
    return jnp.asarray(keras.ops.convert_to_tensor(value), jnp.float32)


class KerasAdapter:
    """Adapter for a ``keras.optimizers.Optimizer``.

    The optimizer state is a dict ``{optimizer variable path: array}``, including the
    iteration counter and, for a constant learning rate, the learning-rate variable.
    """

    family = "keras"
    init_on_host = True
    """``init`` returns the optimizer variables' current values rather than computing them."""

    def __init__(self, optimizer: keras.optimizers.Optimizer, variables: list[keras.Variable]):
        if optimizer.built:
            # A built optimizer holds slots for some other set of variables; take a fresh one
            # with the same configuration instead of mutating the user's.
            optimizer = optimizer.__class__.from_config(optimizer.get_config())
        self.optimizer = optimizer
        self._param_paths = variable_keys(variables)
        self._key_of = {id(v): k for v, k in zip(variables, self._param_paths)}
        self._slot_owner: dict[int, str] = {}
        self._slot_name: dict[int, tuple[Any, str]] = {}  # id(slot) -> (its optimizer, kind)
        self._record_slot_owners(variables)
        self._opt_vars = list(optimizer.variables)
        # Keras numbers optimizer names per session (adam_w, adam_w_1...): keys leave the
        # name out, so a rebuilt optimizer's state has the same keys as the saved one.
        prefix = f"{optimizer.name}/"
        self._opt_paths = [
            k[len(prefix) :] if k.startswith(prefix) else k for k in variable_keys(self._opt_vars)
        ]
        self._averaged = self._schedule_free_slots()
        self.scales_dynamically = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        self._scales_loss = self.scales_dynamically or optimizer.loss_scale_factor is not None

    def _schedule_free_slots(self) -> dict[str, tuple[str, float]]:
        """``{parameter key: (its z slot's state key, beta_1)}`` for ScheduleFreeAdamW slots."""
        schedule_free = getattr(keras.optimizers, "ScheduleFreeAdamW", None)
        found = {}
        for path, var in zip(self._opt_paths, self._opt_vars):
            opt, kind = self._slot_name.get(id(var), (None, None))
            if schedule_free and isinstance(opt, schedule_free) and kind == "momentum":
                beta_1 = opt.beta_1() if callable(opt.beta_1) else opt.beta_1
                found[self._slot_owner[id(var)]] = (path, float(beta_1))
        return found

    def _record_slot_owners(self, variables: list[keras.Variable]) -> None:
        """Build the optimizer, remembering which parameter each slot variable mirrors."""
        # Wrappers (MultiOptimizer, LossScaleOptimizer) make slots in their inner optimizers.
        inner = [*getattr(self.optimizer, "optimizers", ()), getattr(self.optimizer, "inner_optimizer", None)]  # fmt: skip
        owners = [opt for opt in (self.optimizer, *inner) if opt is not None]
        for opt in owners:
            opt.add_variable_from_reference = self._recording(opt, opt.add_variable_from_reference)
        try:
            self.optimizer.build(variables)
        finally:
            for opt in owners:
                del opt.add_variable_from_reference

    def _recording(self, opt, make_slot):
        """``make_slot`` that also remembers which parameter each slot mirrors, and its kind."""

        def recording(reference_variable, *args, **kwargs):
            slot = make_slot(reference_variable, *args, **kwargs)
            self._slot_owner[id(slot)] = self._key_of.get(id(reference_variable), "")
            self._slot_name[id(slot)] = (opt, args[0] if args else kwargs.get("name"))
            return slot

        return recording

    def init(self, params: Params) -> dict[str, jax.Array]:
        """The optimizer variables' initial values (slots zero, iteration 0)."""
        del params  # Keras slots are created from the variables at build time.
        return {p: jnp.asarray(v.value) for p, v in zip(self._opt_paths, self._opt_vars)}

    def update(self, grads: Params, opt_state: Any, params: Params, loss: jax.Array):
        """One ``stateless_apply`` step; the learning rate is read at the pre-step iteration."""
        del loss
        opt_values = [opt_state[p] for p in self._opt_paths]
        with keras.StatelessScope(state_mapping=list(zip(self._opt_vars, opt_values))):
            learning_rate = _learning_rate(self.optimizer)
        new_params, new_opt = self.optimizer.stateless_apply(
            opt_values,
            [grads[p] for p in self._param_paths],
            [params[p] for p in self._param_paths],
        )
        return (
            dict(zip(self._param_paths, new_params)),
            dict(zip(self._opt_paths, new_opt)),
            learning_rate,
        )

    def eval_params(self, params: Params, opt_state: dict[str, jax.Array]) -> Params:
        r"""The parameters to evaluate and export: ``params`` itself, except under
        ``keras.optimizers.ScheduleFreeAdamW``, whose variables hold the gradient point
        :math:`y` and whose ``momentum`` slot the base sequence :math:`z`; its evaluation
        point is the average :math:`x = (y - (1 - \beta_1)\,z) / \beta_1`, recovered as
        Keras' own ``update_step`` recovers it (Keras has no evaluation switch of its own).
        """
        if not self._averaged:
            return params
        out = dict(params)
        for key, (slot, beta_1) in self._averaged.items():
            y, z = params[key], opt_state[slot]
            out[key] = ((y - (1.0 - beta_1) * z) / beta_1).astype(y.dtype)
        return out

    def loss_scale(self, opt_state: dict[str, jax.Array]) -> jax.Array | None:
        """The optimizer's ``scale_loss`` factor at ``opt_state``, as Keras' own JAX trainer
        applies it: a ``LossScaleOptimizer``'s current dynamic scale, or ``loss_scale_factor``
        (of the optimizer, or of a ``MultiOptimizer``, which hands it to its inner ones).
        ``None`` when the optimizer scales nothing. ``stateless_apply`` divides the
        gradients by the same factor."""
        if not self._scales_loss:
            return None
        values = [opt_state[p] for p in self._opt_paths]
        with keras.StatelessScope(state_mapping=list(zip(self._opt_vars, values))):
            scale = self.optimizer.scale_loss(jnp.float32(1.0))
        return jnp.asarray(scale, jnp.float32)

    def group_learning_rates(self, opt_state: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """``{"learning_rate.<i>": rate}`` for each inner optimizer ``i`` of a
        ``MultiOptimizer`` (in ``optimizer.optimizers`` order), at ``opt_state``'s iteration;
        empty for any other optimizer."""
        inner = getattr(self.optimizer, "optimizers", None) or []
        if not inner:
            return {}
        values = [opt_state[p] for p in self._opt_paths]
        with keras.StatelessScope(state_mapping=list(zip(self._opt_vars, values))):
            return {f"learning_rate.{i}": _learning_rate(opt) for i, opt in enumerate(inner)}

    def state_shardings(self, abstract_state, param_shardings: Shardings, replicated):
        """Slots take their parameter's sharding where it divides their shape (Adafactor's
        factored slots do not have their parameter's shape); counters and scalars replicate."""
        owners = {p: self._slot_owner.get(id(v)) for p, v in zip(self._opt_paths, self._opt_vars)}
        return placement.state_shardings(
            abstract_state, param_shardings, replicated, lambda path: owners.get(path[0].key)
        )

    @property
    def variables(self) -> list[keras.Variable]:
        """The optimizer's own variables (slots, iteration, learning rate)."""
        return list(self._opt_vars)

    @property
    def state_keys(self) -> list[str]:
        """Keys of the optimizer state dict, in the optimizer's variable order."""
        return list(self._opt_paths)

    def write_back(self, opt_state: dict[str, jax.Array]) -> None:
        """Copy trained optimizer state into the Keras optimizer's own variables."""
        for path, var in zip(self._opt_paths, self._opt_vars):
            var.assign(opt_state[path])
