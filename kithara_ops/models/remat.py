"""Rematerialisation (``--remat``): Keras' ``RematScope``, with the ``training`` flag static.

Layers made inside a ``keras.RematScope`` recompute their forward pass in the backward pass
instead of keeping their activations (``jax.checkpoint``): less memory for activations, more
compute, the same loss. Keras (3.15) wraps such a layer's whole ``call`` in
``jax.checkpoint``, which traces every argument, the Python ``training`` flag too, so any
layer that branches on it (dropout, KerasHub's decoder blocks, the built-in model's blocks)
fails to trace. ``rematerialize`` keeps Keras' choice of what to recompute and hands the
Python-valued keyword arguments to the call as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import keras

from kithara_ops.config.checks import remat_mode

STATIC = (bool, int, float, str, type(None))
"""Keyword argument values passed to a rematerialised call as constants, not traced."""


@contextlib.contextmanager
def remat_scope(spec: str) -> Iterator[None]:
    """Within: layers made are rematerialised as ``spec`` asks (``none``: not at all).

    ``spec`` is ``none``, ``full`` (every layer), ``activations`` (activation functions
    only) or ``larger_than:N`` (layers whose output has more than N values). Pass the
    model made inside to ``rematerialize`` afterwards.
    """
    mode, threshold = remat_mode(spec)
    if mode == "none":
        yield
        return
    with keras.RematScope(mode=mode, output_size_threshold=threshold):
        yield


def rematerialize(model: keras.Model) -> keras.Model:
    """``model`` with each layer made in a ``remat_scope`` tracing its call with the
    Python-valued keyword arguments (``training``) kept static; returns ``model``."""
    for layer in model._flatten_layers(include_self=True):
        if getattr(layer, "_remat_mode", None) is not None:
            object.__setattr__(layer, "rematerialized_call", _static_call(layer))
    return model


def _static_call(layer: Any) -> Any:
    """``layer.rematerialized_call`` as Keras decides it, but with static keyword values."""
    keras_choice = type(layer).rematerialized_call

    def rematerialized_call(layer_call: Any, *args: Any, **kwargs: Any) -> Any:
        chosen = keras_choice(layer, layer_call, *args, **kwargs)
        if chosen is layer_call or layer._remat_mode.mode == "activations":
            return chosen  # not recomputed, or only its activation is (no flags traced)
        static = {key: value for key, value in kwargs.items() if isinstance(value, STATIC)}

        def recomputed(*call_args: Any, **call_kwargs: Any) -> Any:
            traced = {key: value for key, value in call_kwargs.items() if key not in static}
            body = lambda *a, **kw: layer_call(*a, **kw, **static)  # noqa: E731
            return jax.checkpoint(body)(*call_args, **traced)

        return recomputed

    return rematerialized_call
