"""The adapter for an optimizer of either family: the one place that tells them apart."""

from __future__ import annotations

from typing import Any

import keras
import optax

from kithara_ops.errors import ConfigError
from kithara_ops.optim.adapter import OptimizerAdapter
from kithara_ops.optim.keras_adapter import KerasAdapter
from kithara_ops.optim.optax_adapter import OptaxAdapter


def as_adapter(optimizer: Any, trainable_variables: list[keras.Variable]) -> OptimizerAdapter:
    """Wrap a Keras or Optax optimizer in the adapter the train step uses.

    Args:
      optimizer: a ``keras.optimizers.Optimizer``, an ``optax.GradientTransformation``
        (with or without extra args) or an ``optax.MultiSteps``; an adapter is returned as
        it is.
      trainable_variables: the model's trainable variables, in the model's order.

    Raises:
      ConfigError: for any other type, naming it.
    """
    if isinstance(optimizer, (KerasAdapter, OptaxAdapter)):
        return optimizer  # already adapted
    if isinstance(optimizer, keras.optimizers.Optimizer):
        return KerasAdapter(optimizer, trainable_variables)
    if isinstance(optimizer, optax.MultiSteps):
        return OptaxAdapter(optimizer.gradient_transformation(), user_object=optimizer)
    if isinstance(optimizer, optax.GradientTransformation):
        return OptaxAdapter(optimizer)
    raise ConfigError(
        f"optimizer must be a keras.optimizers.Optimizer or an optax.GradientTransformation, "
        f"got {type(optimizer).__module__}.{type(optimizer).__qualname__}: pass e.g. "
        "keras.optimizers.AdamW(1e-3) or optax.adamw(1e-3)."
    )
