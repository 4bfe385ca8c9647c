"""``TrainState``: everything that changes during training, as one pytree.

Parameters and non-trainable variables are dicts keyed by Keras variable path, so that
checkpoints, Optax masks and sharding rules all speak the same names.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import keras


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """The whole mutable state of a run; the jit-compiled step maps it to the next one.

    Attributes:
      step: number of optimizer steps taken (int32 scalar).
      params: trainable variables, ``{path: array}``.
      non_trainable: non-trainable variables (norm statistics, RNG seed states), ``{path: array}``.
      opt_state: the optimizer's state pytree (Keras optimizer variables or Optax state).
      rng: the key the step derives all its randomness from (dropout seeds).
    """

    step: jax.Array
    params: dict[str, jax.Array]
    non_trainable: dict[str, jax.Array]
    opt_state: Any
    rng: jax.Array


def variable_keys(variables: list[keras.Variable]) -> list[str]:
    """Unique dict keys for ``variables``: their paths, suffixed ``#n`` where paths repeat."""
    seen: dict[str, int] = {}
    keys = []
    for var in variables:
        n = seen.get(var.path, 0)
        seen[var.path] = n + 1
        keys.append(var.path if n == 0 else f"{var.path}#{n}")
    return keys
