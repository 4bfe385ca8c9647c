"""One interface for Keras and Optax optimizers.

The Trainer and the train step only ever see an ``OptimizerAdapter``: ``init`` builds the
optimizer state for a dict of parameters (keyed by Keras variable path), ``update`` applies
one step and reports the learning rate it used, ``state_shardings`` places the state,
``variables`` and ``write_back`` connect it with the optimizer object the user holds. Which
family the optimizer came from is known in ``family.py`` and the two adapter modules only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import keras

Params = dict[str, jax.Array]
Shardings = dict[str, jax.sharding.Sharding]


class OptimizerAdapter(Protocol):
    """What the Trainer needs from an optimizer, whatever its family."""

    family: str
    """``"keras"`` or ``"optax"``."""
    optimizer: Any
    """The optimizer object the user passed (never wrapped or modified)."""
    init_on_host: bool
    """``True`` if ``init`` reads existing values (placed as they are) rather than computing
    the state (then compiled, so it is created on the devices already sharded)."""

    def init(self, params: Params) -> Any:
        """Return the initial optimizer state (a pytree of arrays) for ``params``."""

    def update(
        self, grads: Params, opt_state: Any, params: Params, loss: jax.Array
    ) -> tuple[Params, Any, jax.Array]:
        """Apply one step: return ``(new_params, new_opt_state, learning_rate_used)``.

        Pure and traceable: called inside the jit-compiled train step.
        """

    scales_dynamically: bool
    """``True`` when the optimizer itself skips a step whose scaled gradient is not finite
    and lowers its loss scale (Keras ``LossScaleOptimizer``)."""

    def loss_scale(self, opt_state: Any) -> jax.Array | None:
        r"""The factor :math:`s` the optimizer expects the loss to be multiplied by before it is
        differentiated, at ``opt_state``: it divides the gradients by :math:`s` itself, so the
        step must hand it :math:`\nabla (s L) = s \nabla L`. ``None`` when it scales nothing.
        Pure and traceable."""

    def group_learning_rates(self, opt_state: Any) -> dict[str, jax.Array]:
        """Extra ``learning_rate.<i>`` step metrics, one per group of parameters with an
        optimizer of its own (Keras ``MultiOptimizer``), at ``opt_state``; else empty."""

    def eval_params(self, params: Params, opt_state: Any) -> Params:
        """The parameters evaluation and export use: ``params`` itself (the same object, no
        work) for most optimizers; a schedule-free optimizer's averaged sequence, computed
        leaf by leaf where each parameter lives. Pure and traceable."""

    def state_shardings(
        self, abstract_state: Any, param_shardings: Shardings, replicated: jax.sharding.Sharding
    ) -> Any:
        """Shardings for the optimizer state: per-parameter slots follow their parameter."""

    @property
    def state_keys(self) -> list[str] | None:
        """Keys of a dict-shaped state in the optimizer's own order (matched by position on
        restore, like the model's variables), or ``None`` for a state with fixed structure."""

    @property
    def variables(self) -> list[keras.Variable]:
        """Variables the optimizer object itself holds (parked on the host while training)."""

    def write_back(self, opt_state: Any) -> None:
        """Copy a trained state into the optimizer object, where it keeps one (else no-op)."""


LearningRate = float | Callable[[jax.Array], jax.Array]
