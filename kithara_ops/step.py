"""The pure train and eval steps, built once per run and compiled by the Trainer.

``train_step(state, batch) -> (state, metrics)`` runs the model with ``stateless_call``,
differentiates the masked token-level cross entropy, and hands the gradients to the
optimizer adapter. It never branches on the optimizer family and never talks to the host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import keras
import optax

from kithara_ops.models.adapter import ModelAdapter, adapt_model, takes_training
from kithara_ops.optim.adapter import OptimizerAdapter
from kithara_ops.optim.monitors import clipped, state_monitors
from kithara_ops.state import SEED_STATE, TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def masked_cross_entropy(
    logits: jax.Array, targets: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    r"""Summed token cross entropy and the number of tokens it counts.

    .. math:: \text{sum} = \sum_{b,t} m_{b,t}\,\bigl(-\log \operatorname{softmax}(z_{b,t})_{y_{b,t}}\bigr),
              \quad \text{count} = \sum_{b,t} m_{b,t}

    The mean loss is ``sum / count``. Returning both lets gradient accumulation and data
    parallelism weight every token equally, whatever the split.
    """
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    mask = mask.astype(jnp.float32)
    return jnp.sum(per_token * mask), jnp.sum(mask)


def global_norm(tree: Any) -> jax.Array:
    r"""The Euclidean norm of all the arrays of ``tree`` taken as one vector, in float32.

    .. math:: \lVert \theta \rVert = \sqrt{\textstyle\sum_{\text{arrays } a} \sum_i a_i^2}

    Squares are summed in float32 even for bfloat16 arrays, whose own sums would lose the
    small terms.
    """
    squares = [jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(squares, jnp.float32(0)))


class StepBuilder:
    """Builds the train and eval steps for one Keras model and one optimizer adapter.

    Args:
      model: the Keras model; only its ``stateless_call`` is used inside the steps.
      adapter: the optimizer adapter.
      param_keys: keys of ``state.params`` in the order of ``model.trainable_variables``.
      non_trainable_keys: keys of ``state.non_trainable`` in the model's order.
      grad_accum_steps: micro-batches per step; gradients are summed over them.
      micro_batch_sharding: sharding of one micro-batch, so each stays split over all devices.
      skip_nonfinite: a step whose loss or gradient norm is not finite leaves the parameters,
        optimizer state and non-trainable variables as they were.
      model_adapter: how a batch feeds the model and its output gives logits; by default
        ``adapt_model(model)``.
      clipping: the optimizer's clipping (its description's ``{"kind", "value"}``), for the
        ``clipped`` metric (``optim.monitors``).
      frozen_keys: non-trainable keys the step hands on unchanged whatever the model's call
        returns (a LoRA model's base weights, which checkpoints leave out).
    """

    def __init__(
        self,
        model: keras.Model,
        adapter: OptimizerAdapter,
        param_keys: list[str],
        non_trainable_keys: list[str],
        grad_accum_steps: int = 1,
        micro_batch_sharding: jax.sharding.Sharding | None = None,
        skip_nonfinite: bool = False,
        model_adapter: ModelAdapter | None = None,
        clipping: dict | None = None,
        frozen_keys: Sequence[str] = (),
    ):
        self.model = model
        self.adapter = adapter
        self.param_keys = param_keys
        self.non_trainable_keys = non_trainable_keys
        self.grad_accum_steps = grad_accum_steps
        self.micro_batch_sharding = micro_batch_sharding
        self.skip_nonfinite = skip_nonfinite
        self.clipping = clipping
        self.frozen_keys = list(frozen_keys)
        self.model_adapter = model_adapter if model_adapter is not None else adapt_model(model)
        # Keras draws dropout noise from SeedGenerator states kept as non-trainable variables.
        # Refreshing them from the state's key each step makes that key the single source of
        # randomness, which the checkpoint carries.
        self.seed_keys = [k for k in non_trainable_keys if k.endswith(SEED_STATE)]
        self.passes_training = takes_training(model)

    def _forward(self, params, non_trainable, batch, training: bool):
        kwargs = {"training": training} if self.passes_training else {}
        outputs, new_non_trainable = self.model.stateless_call(
            [params[k] for k in self.param_keys],
            [non_trainable[k] for k in self.non_trainable_keys],
            self.model_adapter.inputs(batch),
            **self.model_adapter.keywords(batch),
            **kwargs,
        )
        logits = self.model_adapter.logits(outputs)
        mask = self.model_adapter.loss_mask(batch)
        loss_sum, count = masked_cross_entropy(logits, batch["y"], mask)
        return loss_sum, (count, dict(zip(self.non_trainable_keys, new_non_trainable)))

    def _gradients(self, params, non_trainable, batch, scale=None):
        r"""Summed loss, token count, summed gradients and updated non-trainables.

        With a loss ``scale`` :math:`s` the gradients are :math:`\nabla (s L)`, :math:`L` the
        summed loss (returned unscaled): what a loss-scaling optimizer divides by :math:`s`.
        """

        def objective(params, non_trainable, batch):
            loss_sum, (count, nt) = self._forward(params, non_trainable, batch, True)
            return (loss_sum if scale is None else loss_sum * scale), (loss_sum, count, nt)

        grad_fn = jax.value_and_grad(objective, has_aux=True)
        if self.grad_accum_steps == 1:
            (_, (loss_sum, count, nt)), grads = grad_fn(params, non_trainable, batch)
            return loss_sum, count, grads, nt

        def micro_step(carry, micro_batch):
            loss_acc, count_acc, grads_acc, nt = carry
            if self.micro_batch_sharding is not None:
                micro_batch = jax.lax.with_sharding_constraint(
                    micro_batch, self.micro_batch_sharding
                )
            (_, (loss_sum, count, nt)), grads = grad_fn(params, nt, micro_batch)
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            return (loss_acc + loss_sum, count_acc + count, grads_acc, nt), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        init = (jnp.float32(0), jnp.float32(0), zeros, non_trainable)
        (loss_sum, count, grads, nt), _ = jax.lax.scan(
            micro_step, init, split_micro_batches(batch, self.grad_accum_steps)
        )
        return loss_sum, count, grads, nt

    def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        """One optimizer step on one global batch."""
        rng, step_rng = jax.random.split(state.rng)
        non_trainable = dict(state.non_trainable)
        for i, key in enumerate(self.seed_keys):
            seed = jax.random.bits(jax.random.fold_in(step_rng, i), (2,), jnp.uint32)
            non_trainable[key] = seed.astype(non_trainable[key].dtype)

        # The optimizer's loss scale, as it expects it (Keras loss scaling): it gets the
        # scaled gradients and divides them by the scale itself.
        scale = self.adapter.loss_scale(state.opt_state)
        loss_sum, count, grads, non_trainable = self._gradients(
            state.params, non_trainable, batch, scale
        )
        # Handed on as they came in, so a checkpoint without them loses nothing (and XLA
        # aliases the donated buffers instead of copying the base model).
        non_trainable.update({key: state.non_trainable[key] for key in self.frozen_keys})
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
        loss = loss_sum / denom
        # The metrics describe the loss's own gradient, whatever scale the optimizer sees.
        raw = grads if scale is None else jax.tree.map(lambda g: g / scale.astype(g.dtype), grads)
        grad_norm = optax.global_norm(raw)
        group_rates = self.adapter.group_learning_rates(state.opt_state)  # the pre-step ones
        params, opt_state, learning_rate = self.adapter.update(
            grads, state.opt_state, state.params, loss
        )
        # Flagged here, on the devices: the host learns of it at the next logging step.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if self.adapter.scales_dynamically:
            # A scaled gradient that overflowed while the scale was above 1 is what dynamic
            # loss scaling expects: the optimizer skipped the step and halved its scale,
            # which skip_nonfinite must keep. At a scale of 1 or less it is the gradient's own.
            finite = finite | (jnp.isfinite(loss) & (scale > 1))
        if self.skip_nonfinite:
            # Like optax.apply_if_finite: a non-finite step changes nothing but the step
            # count and the key, so the data and the randomness move on.
            kept = (state.params, state.opt_state, state.non_trainable)
            params, opt_state, non_trainable = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old),
                (params, opt_state, non_trainable),
                kept,
            )
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            non_trainable=non_trainable,
            opt_state=opt_state,
            rng=rng,
        )
        # Optimizer dynamics, on the devices like the rest: the update actually applied (after
        # the optimizer's own clipping or scaling, zero for a skipped step) and the parameters
        # it led to. ``grad_norm`` above is the raw gradient's, before any clipping.
        update = jax.tree.map(jnp.subtract, params, state.params)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "update_norm": global_norm(update),
            "param_norm": global_norm(params),
            "learning_rate": learning_rate,
            "tokens": count,
            "finite": finite,
        }
        if "segment_ids" in batch:  # the share of the rows that is text, not padding
            metrics["packing.real_token_fraction"] = jnp.mean(batch["segment_ids"] > 0)
        acted = clipped(raw, grad_norm, self.clipping)
        if acted is not None:
            metrics["clipped"] = acted
        metrics.update(group_rates)
        metrics.update(state_monitors(opt_state))
        return new_state, metrics

    def eval_step(
        self, params: dict, opt_state: Any, non_trainable: dict, batch: Batch
    ) -> tuple[jax.Array, jax.Array]:
        """Summed loss and token count of one eval batch (the model in inference mode).

        The model is evaluated at ``adapter.eval_params(params, opt_state)``: the parameters
        themselves, or a schedule-free optimizer's average, computed here on the devices.
        """
        params = self.adapter.eval_params(params, opt_state)
        loss_sum, (count, _) = self._forward(params, non_trainable, batch, False)
        return loss_sum, count


def split_micro_batches(batch: Batch, n: int) -> Batch:
    """Reshape ``(B, ...)`` arrays to ``(n, B // n, ...)``, taking rows ``i, i+n, ...``.

    Strided rather than contiguous rows: with the batch split over devices in contiguous
    blocks, every micro-batch then still has rows on every device.
    """

    def split(x):
        return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
    """The jit-wrapped functions of a run, every sharding explicit (compiled on first call).

    Attributes:
      init_optimizer: parameters -> a fresh optimizer state, placed by its shardings.
      train_step: ``(state, batch) -> (state, metrics)``, the state donated.
      eval_step: ``(params, opt_state, non_trainable, batch) -> (loss sum, token count)``.
    """

    init_optimizer: Callable[[dict], Any]
    train_step: Callable
    eval_step: Callable


def compile_steps(
    builder: StepBuilder, shardings: TrainState, batch: jax.sharding.Sharding
) -> CompiledSteps:
    """Wrap ``builder``'s steps for the state ``shardings`` and the batch sharding ``batch``."""
    repl = shardings.step
    adapter = builder.adapter
    if adapter.init_on_host:
        # Initial values read from the optimizer's own variables: under jit they would
        # become constants of the executable and stay on the device as long as it does.
        def init_optimizer(params):
            return jax.device_put(adapter.init(params), shardings.opt_state)

    else:  # computed state is built on the devices, already sharded
        init_optimizer = jax.jit(adapter.init, out_shardings=shardings.opt_state)
    if builder.frozen_keys:
        train_step = FrozenAside(builder, shardings, batch)
    else:
        train_step = jax.jit(
            builder.train_step,
            in_shardings=(shardings, batch),
            out_shardings=(shardings, repl),
            donate_argnums=0,
        )
    eval_step = jax.jit(
        builder.eval_step,
        in_shardings=(shardings.params, shardings.opt_state, shardings.non_trainable, batch),
        out_shardings=(repl, repl),
    )
    return CompiledSteps(init_optimizer, train_step, eval_step)


class FrozenAside:
    """The train step with the frozen weights passed beside the donated state, not in it.

    ``(state, batch) -> (state, metrics)`` like the plain jitted step, but the frozen
    non-trainable entries (``builder.frozen_keys``, a LoRA model's base) are a separate,
    undonated argument, and the returned state holds the very arrays that came in. So the
    state can share them with the Keras model's variables (one copy of the base on the
    devices, not two), and a step never invalidates them.
    """

    def __init__(self, builder: StepBuilder, shardings: TrainState, batch: jax.sharding.Sharding):
        self.frozen = list(builder.frozen_keys)

        def step(rest: TrainState, frozen: dict, batch_: Batch):
            whole = dataclasses.replace(rest, non_trainable={**rest.non_trainable, **frozen})
            new, metrics = builder.train_step(whole, batch_)
            return self._split(new)[0], metrics

        rest, frozen = self._split(shardings)
        self.jitted = jax.jit(
            step,
            in_shardings=(rest, frozen, batch),
            out_shardings=(rest, shardings.step),
            donate_argnums=0,
        )

    def _split(self, state: TrainState) -> tuple[TrainState, dict]:
        wanted = set(self.frozen)
        rest = {k: v for k, v in state.non_trainable.items() if k not in wanted}
        frozen = {k: v for k, v in state.non_trainable.items() if k in wanted}
        return dataclasses.replace(state, non_trainable=rest), frozen

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        rest, frozen = self._split(state)
        new, metrics = self.jitted(rest, frozen, batch)
        return dataclasses.replace(new, non_trainable={**new.non_trainable, **frozen}), metrics

    def lower(self, state: Any, batch: Any) -> Any:
        """The lowering of the step for ``state`` and ``batch`` (arrays or abstract)."""
        return self.jitted.lower(*self._split(state), batch)

    def _cache_size(self) -> int:
        return self.jitted._cache_size()
