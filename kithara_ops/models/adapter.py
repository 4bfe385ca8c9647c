"""The one model contract of the train step: batch -> model inputs -> logits.

A trainable model maps token ids to logits of shape ``(batch, seq, vocab)``. It takes them
either as one int array (the built-in model, most users' Keras models) or as a dict of named
inputs, as KerasHub causal LMs do (``{"token_ids", "padding_mask"}``). ``adapt_model`` reads
which from the model's declared inputs, once, and the step then only calls the adapter: it
never asks where a model came from.

The loss weights every target by ``batch["mask"]`` (prompt and padding tokens weigh 0) times
``batch["padding_mask"]`` when the batch has one.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np

from kithara_ops.errors import ConfigError

TOKEN_INPUTS = {"token_ids": "x", "padding_mask": "padding_mask"}
"""Named model inputs the adapter can fill, and the batch key each comes from."""


@dataclasses.dataclass(frozen=True)
class ModelAdapter:
    """How one model is fed and read.

    Attributes:
      input_names: the model's named inputs (each a key of ``TOKEN_INPUTS``), or ``None``
        when the model takes the token ids as one array.
      takes_segments: the model's call takes ``segment_ids`` and ``positions`` keywords
        (packed documents kept apart, ``data.packing``).
    """

    input_names: tuple[str, ...] | None = None
    takes_segments: bool = False

    def keywords(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """The batch's ``segment_ids`` and ``positions``, for a model that takes them."""
        if not self.takes_segments:
            return {}
        return {key: batch[key] for key in ("segment_ids", "positions") if key in batch}

    def inputs(self, batch: Mapping[str, jax.Array]) -> Any:
        """The model's inputs for ``batch``: ``batch["x"]``, or a dict of named inputs.

        A ``padding_mask`` input is the batch's own when it has one, else all ones (packed
        sequences have no padding the model must not attend to: trailing padding comes
        after every real token, so a causal model never sees it from them).
        """
        if self.input_names is None:
            return batch["x"]
        values = {"x": batch["x"], "padding_mask": padding_mask(batch)}
        return {name: values[TOKEN_INPUTS[name]] for name in self.input_names}

    def loss_mask(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Per-target loss weights: ``mask`` (default ones) times the padding mask."""
        mask = batch.get("mask")
        mask = jnp.ones(batch["y"].shape, jnp.float32) if mask is None else mask
        if "padding_mask" in batch:
            mask = mask * batch["padding_mask"].astype(mask.dtype)
        return mask

    def logits(self, outputs: Any) -> jax.Array:
        """The logits in the model's outputs (the model's output itself)."""
        return outputs


def padding_mask(batch: Mapping[str, jax.Array]) -> jax.Array:
    """``batch["padding_mask"]`` as int32, or ones shaped like ``batch["x"]``."""
    given = batch.get("padding_mask")
    if given is None:
        return jnp.ones(batch["x"].shape, jnp.int32)
    return given.astype(jnp.int32)


def adapt_model(model: keras.Model) -> ModelAdapter:
    """The adapter for ``model``, from the inputs it declares.

    Raises:
      ConfigError: a KerasHub backbone (no language-model head), or a model whose named
        inputs include one the adapter cannot fill.
    """
    _refuse_backbone(model)
    declared = _declared_inputs(model)
    if not isinstance(declared, Mapping):
        return ModelAdapter(takes_segments=takes_keywords(model, "segment_ids", "positions"))
    unknown = sorted(set(declared) - set(TOKEN_INPUTS))
    if unknown or "token_ids" not in declared:
        raise ConfigError(
            f"model {model.name!r} takes inputs {sorted(declared)}, and only "
            f"{sorted(TOKEN_INPUTS)} can be fed from token batches: pass a causal LM whose "
            "inputs are token ids (e.g. keras_hub.models.CausalLM.from_preset(...))."
        )
    return ModelAdapter(tuple(name for name in TOKEN_INPUTS if name in declared))


def check_trainable(model: keras.Model, adapter: ModelAdapter, seq_len: int) -> int | None:
    """Check that ``model`` gives ``(batch, seq, vocab)`` logits; return ``vocab``.

    The output's shape comes from ``jax.eval_shape`` on a ``(1, seq_len)`` batch: the model
    is traced once and nothing runs on the devices.

    Returns:
      The vocabulary (last dimension of the logits), or ``None`` when the model cannot be
      traced this way (the compiled step then reports what is wrong).

    Raises:
      ConfigError: the output is not one ``(batch, seq, vocab)`` array.
    """
    batch = {"x": jax.ShapeDtypeStruct((1, seq_len), np.int32)}

    def forward(batch):
        return adapter.logits(model(adapter.inputs(batch)))

    try:
        out = jax.eval_shape(forward, batch)
    except Exception:  # e.g. a model built for a fixed other length: the step tells
        return None
    shape = getattr(out, "shape", None)
    if shape is None or len(shape) != 3 or tuple(shape[:2]) != (1, seq_len):
        got = shape if shape is not None else type(out).__name__
        raise ConfigError(
            f"model {model.name!r} returns {got} for token ids of shape (1, {seq_len}), not "
            "logits (batch, seq, vocab): pass a causal language model (a KerasHub CausalLM, "
            "not its backbone)."
        )
    return int(shape[-1])


def written_in_training(model: keras.Model, adapter: ModelAdapter, seq_len: int) -> set[int]:
    """Positions in ``model.non_trainable_variables`` of the variables a training forward
    pass writes (normalisation statistics, seed states), read from its traced program.

    ``stateless_call`` hands back every non-trainable value; one it never assigns comes back
    as the very input it was given, which the traced program shows as an output that is an
    input. Nothing runs on the devices. A model that cannot be traced on a ``(1, seq_len)``
    batch counts every variable as written: nothing is then taken for frozen.
    """
    count = len(model.non_trainable_variables)
    if not count:
        return set()
    trainable = [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in model.trainable_variables]
    fixed = [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in model.non_trainable_variables]
    batch = {"x": jax.ShapeDtypeStruct((1, seq_len), np.int32)}
    kwargs = {"training": True} if takes_training(model) else {}

    try:
        traced = jax.make_jaxpr(
            lambda values, non_trainable, batch: model.stateless_call(
                values, non_trainable, adapter.inputs(batch), **kwargs
            )[1]
        )(trainable, fixed, batch).jaxpr
    except Exception:  # e.g. a model built for a fixed other length
        return set(range(count))
    inputs = traced.invars[len(trainable) : len(trainable) + count]
    return {i for i, (out, var) in enumerate(zip(traced.outvars, inputs)) if out is not var}


def takes_training(model: keras.Model) -> bool:
    """Whether the model's ``call`` takes ``training``: ``stateless_call`` hands its keywords
    to ``call`` itself, so only such a call may be given it."""
    try:
        parameters = inspect.signature(model.call).parameters
    except (TypeError, ValueError):
        return True
    return "training" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


def takes_keywords(model: keras.Model, *names: str) -> bool:
    """Whether the model's ``call`` names every one of ``names`` as a parameter."""
    try:
        parameters = inspect.signature(model.call).parameters
    except (TypeError, ValueError):
        return False
    return all(name in parameters for name in names)


def _declared_inputs(model: keras.Model) -> Any:
    """The model's declared input structure, or ``None`` for a model without one."""
    try:
        return model.input
    except (AttributeError, ValueError):  # subclassed models declare none
        return None


def _refuse_backbone(model: keras.Model) -> None:
    """A KerasHub backbone returns hidden states, not logits: say what to pass instead."""
    names = {f"{cls.__module__}.{cls.__name__}" for cls in type(model).__mro__}
    if "keras_hub.src.models.backbone.Backbone" in names:
        raise ConfigError(
            f"model {model.name!r} is a KerasHub {type(model).__name__}, which has no "
            "language-model head: pass its causal LM, e.g. "
            "keras_hub.models.CausalLM.from_preset(...), or --model <preset folder>."
        )


def resolve_precision(model: keras.Model, precision: str, asked: bool, choices) -> str:
    """The precision a run really trains with: the model's dtype policy, checked.

    Args:
      model: the model; its ``dtype_policy`` decides how it computes and stores weights.
      precision: the run's ``precision`` option.
      asked: whether the option was set by the caller (a config, a keyword); if not, the
        model's own policy is taken, so what is recorded is what ran.
      choices: the values ``precision`` may take.

    Raises:
      ConfigError: the option and the model's policy differ, or the policy is not one of
        ``choices``.
    """
    policy = model.dtype_policy.name
    if policy == precision:
        return precision
    if not asked and policy in choices:
        return policy
    if asked:
        raise ConfigError(
            f"precision is {precision!r} but model {model.name!r} has dtype policy {policy!r}: "
            f"build or load the model with dtype={precision!r} (from_preset(..., dtype=...)) "
            "or pass the precision it has."
        )
    raise ConfigError(
        f"model {model.name!r} has dtype policy {policy!r}, which kithara-ops does not train "
        f"with: build or load it with dtype one of {', '.join(choices)}."
    )
