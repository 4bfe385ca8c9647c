"""A minimal hand-written training loop: the floor the Trainer's step time is measured against.

The same maths as the Trainer's step (``stateless_call``, the masked token cross entropy, an
Optax update) and nothing else: parameters as a list, one ``jax.jit`` with the state donated,
no metrics beyond the loss, no callbacks, and each batch put on the device one step ahead.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax

from kithara_ops.step import masked_cross_entropy


@dataclasses.dataclass
class ReferenceResult:
    """Timings of one reference run.

    Attributes:
      step_seconds: mean seconds per step after the first.
      first_step_seconds: seconds of the first step: tracing, compilation and one run.
      loss: the last step's loss.
      compilations: how many times the step was compiled.
    """

    step_seconds: float
    first_step_seconds: float
    loss: float
    compilations: int


def train(
    model: keras.Model,
    optimizer: optax.GradientTransformation,
    batches: Sequence[Mapping[str, np.ndarray]],
    param_shardings: Sequence[jax.sharding.Sharding] | None = None,
    batch_sharding: jax.sharding.Sharding | None = None,
    non_trainable_shardings: Sequence[jax.sharding.Sharding] | None = None,
    inputs: Callable[[Mapping[str, jax.Array]], Any] = lambda batch: batch["x"],
) -> ReferenceResult:
    """Train ``model`` for one step per batch and time the steps after the first.

    Args:
      model: a built Keras model mapping token ids to logits; its variables are left as
        they were (the loop trains copies).
      optimizer: an Optax transformation.
      batches: at least two host batches with ``x``, ``y`` and ``mask``.
      param_shardings: where each trainable variable goes, in the model's order (default:
        the default device). The step follows its inputs' placement, as ``jax.jit`` does
        without explicit shardings.
      batch_sharding: where each batch goes (default: the default device).
      non_trainable_shardings: with ``param_shardings``, where each non-trainable variable
        goes, in the model's order (default: replicated). A LoRA model's frozen base is
        non-trainable and is sharded like the Trainer shards it.
      inputs: the model's inputs for a batch (default: its token ids ``batch["x"]``).
    """
    if len(batches) < 2:
        raise ValueError("the reference loop needs at least two batches to time a step.")

    def loss_fn(params, non_trainable, batch):
        logits, non_trainable = model.stateless_call(
            params, non_trainable, inputs(batch), training=True
        )
        loss_sum, count = masked_cross_entropy(logits, batch["y"], batch["mask"])
        return loss_sum / jnp.maximum(count, 1.0), non_trainable

    def step(params, non_trainable, opt_state, batch):
        (loss, non_trainable), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, non_trainable, batch
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), non_trainable, opt_state, loss

    # Copies, so donating them leaves the Keras variables intact.
    copy = lambda v, where=None: jax.device_put(v.value, where, may_alias=False)  # noqa: E731
    if param_shardings is None:
        params = [copy(v) for v in model.trainable_variables]
        non_trainable = [copy(v) for v in model.non_trainable_variables]
        opt_state = jax.jit(optimizer.init)(params)
        step = jax.jit(step, donate_argnums=(0, 1, 2))
    else:
        # Sharded: outputs placed like the inputs, or the second step would compile again.
        replicated = jax.sharding.NamedSharding(
            param_shardings[0].mesh, jax.sharding.PartitionSpec()
        )
        param_shardings = list(param_shardings)
        params = [copy(v, where) for v, where in zip(model.trainable_variables, param_shardings)]
        nt_shardings = list(
            non_trainable_shardings or [replicated] * len(model.non_trainable_variables)
        )
        non_trainable = [
            copy(v, where) for v, where in zip(model.non_trainable_variables, nt_shardings)
        ]
        opt_shardings = optax.tree_map_params(
            optimizer,
            lambda _, sharding: sharding,
            jax.eval_shape(optimizer.init, params),
            param_shardings,
            transform_non_params=lambda _: replicated,
            is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
        )
        opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
        step = jax.jit(
            step,
            donate_argnums=(0, 1, 2),
            out_shardings=(param_shardings, nt_shardings, opt_shardings, replicated),
        )

    def put(batch):
        return jax.device_put(dict(batch), batch_sharding)

    upcoming = put(batches[0])
    start = first_step = 0.0
    loss = None
    for i in range(len(batches)):
        batch = upcoming
        if i + 1 < len(batches):
            upcoming = put(batches[i + 1])
        if i == 0:
            began = time.perf_counter()
        params, non_trainable, opt_state, loss = step(params, non_trainable, opt_state, batch)
        if i == 0:
            jax.block_until_ready(loss)
            start = time.perf_counter()
            first_step = start - began
    jax.block_until_ready((params, opt_state, loss))
    elapsed = time.perf_counter() - start
    return ReferenceResult(
        step_seconds=elapsed / (len(batches) - 1),
        first_step_seconds=first_step,
        loss=float(loss),
        compilations=step._cache_size(),
    )
