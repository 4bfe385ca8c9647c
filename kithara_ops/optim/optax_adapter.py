"""Optax transformations, applied as the pure functions they are."""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
import optax

from kithara_ops.errors import ConfigError
from kithara_ops.optim import placement
from kithara_ops.optim.adapter import Params, Shardings
from kithara_ops.optim.introspect import TxNode, find_learning_rate, walk

_LINE_SEARCH = (
    "a line search that calls the loss function (value_fn)",
    "use optax.lbfgs(..., linesearch=None) or an optimizer such as optax.adamw",
)
_NEEDS_A_FUNCTION = {  # transformation -> (what its update needs that the step cannot give, fix)
    "scale_by_zoom_linesearch": _LINE_SEARCH,
    "scale_by_backtracking_linesearch": _LINE_SEARCH,
    "hutchinson_estimator_diag_hessian": (
        "the loss as a function of the parameters (obj_fn) for Hessian-vector products",
        "use an optimizer without curvature estimates, such as optax.adamw",
    ),
    "differentially_private_aggregate": (
        "per-example gradients (a batch axis on every gradient)",
        "use optax.chain(optax.clip_by_global_norm(...), optax.sgd(...)) instead",
    ),
}


def refuse_unsupported(tree: TxNode) -> None:
    """Raise ``ConfigError`` for a transformation whose update needs more than the loss.

    The train step hands ``update`` the gradients, the parameters and the loss (``value``);
    a line search or Sophia's Hessian estimate also needs the loss as a function to call at
    other points, opaque SAM a gradient function (``grad_fn``) and DP-SGD per-example
    gradients, which a compiled step over batches cannot offer.
    """
    why, fix = _NEEDS_A_FUNCTION.get(tree.name, (None, None))
    if tree.name == "sam" and tree.hyperparams.get("opaque_mode"):
        why = "a gradient function to call at perturbed parameters (grad_fn, opaque_mode=True)"
        fix = "use optax.contrib.sam(..., opaque_mode=False)"
    if why is not None:
        raise ConfigError(
            f"optax {tree.name} cannot be trained here: its update needs {why}, which the "
            f"train step cannot provide: {fix}."
        )
    for child in tree.children:
        refuse_unsupported(child)


def takes_value(update: Any) -> bool:
    """Whether ``update`` accepts ``value=`` (named, or through ``**extra_args``)."""
    try:
        params = inspect.signature(update).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "value" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _schedule_free_states(opt_state: Any) -> list:
    """Every ``ScheduleFreeState`` in ``opt_state``, however deep the wrappers put it."""
    kind = getattr(optax.contrib, "ScheduleFreeState", None)
    if kind is None:
        return []
    nodes = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, kind))
    return [node for node in nodes if isinstance(node, kind)]


class OptaxAdapter:
    """Adapter for an ``optax.GradientTransformation`` (or ``MultiSteps``).

    The optimizer state is Optax's own state pytree. The learning rate reported for a step is
    read, in this order, from ``inject_hyperparams`` state (the value the update used), from a
    schedule evaluated at the state's update count, or from a constant learning rate; it is
    NaN when none of these is present (a custom transformation).
    """

    family = "optax"
    init_on_host = False
    scales_dynamically = False

    def __init__(self, tx: optax.GradientTransformation, user_object: Any = None):
        self.optimizer = user_object if user_object is not None else tx
        self._tx = tx
        self._extra_args = isinstance(tx, optax.GradientTransformationExtraArgs) and takes_value(
            tx.update
        )
        tree = walk(tx)
        refuse_unsupported(tree)
        self._learning_rate = find_learning_rate(tree)

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

    def eval_params(self, params: Params, opt_state: Any) -> Params:
        r"""The parameters to evaluate and export.

        ``params`` itself, except under ``optax.contrib.schedule_free`` (and its
        ``schedule_free_adamw`` / ``_sgd`` forms, wrapped or not): there the parameters are
        the gradient point :math:`y`, and evaluation takes the average
        :math:`x = (y - (1 - \beta_1)\,z) / \beta_1`
        (``optax.contrib.schedule_free_eval_params``) for each ``ScheduleFreeState`` found
        in ``opt_state``. Where one covers only some parameters (inside ``multi_transform``
        or ``masked``), only those change; the training state keeps :math:`y`.
        """
        states = _schedule_free_states(opt_state)
        if not states:
            return params
        out = dict(params)
        for found in states:
            z = found.z
            if isinstance(z, dict) and set(z) <= set(params):
                keys = [k for k, zi in z.items() if getattr(zi, "shape", None) == params[k].shape]
                part = optax.contrib.schedule_free_eval_params(
                    found._replace(z={k: z[k] for k in keys}), {k: out[k] for k in keys}
                )
                out.update({k: v.astype(params[k].dtype) for k, v in part.items()})
        return out

    def loss_scale(self, opt_state: Any) -> None:
        """None: an Optax transformation takes the gradient of the loss itself."""
        del opt_state

    def group_learning_rates(self, opt_state: Any) -> dict:
        """None: an Optax transformation reports one learning rate (see ``update``)."""
        del opt_state
        return {}

    state_keys = None
    """Optax states have a fixed structure: restored by path, not by position."""

    variables: tuple = ()
    """An Optax transformation holds no variables: its state lives in the train state only."""

    def write_back(self, opt_state: Any) -> None:
        """Nothing to do: an Optax transformation keeps no state of its own."""
        del opt_state

    def state_shardings(self, abstract_state, param_shardings: Shardings, replicated):
        """Each leaf by its own shape: its parameter's sharding where that divides it, else
        replicated (see ``placement.py``)."""
        return placement.state_shardings(abstract_state, param_shardings, replicated)
