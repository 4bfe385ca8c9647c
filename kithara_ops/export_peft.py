"""A LoRA run's adapters as a PEFT adapter folder (``adapter_config.json`` and
``adapter_model.safetensors``), the form vLLM and Hugging Face PEFT load beside a base model.

The folder follows PEFT 0.17's ``save_pretrained`` for a LoRA adapter of a causal LM: tensors
``base_model.model.<module>.lora_A.weight`` of shape ``(r, in)`` and ``...lora_B.weight`` of
shape ``(out, r)``, so that the module's weight becomes ``W + (alpha / r) B A`` (its
transpose for GPT-2's ``Conv1D`` modules, whose config says ``fan_in_fan_out``). Keras'
LoRA freezes an adapted layer's kernel but not its bias, so where adapted layers have biases
they trained too: they are written as ``base_model.model.<module>.bias`` with ``bias:
"lora_only"``, PEFT's setting for biases that train with the adapters.

Hugging Face names and layouts come from KerasHub's own Hugging Face exporter: its weights map
is a linear function of each layer's kernel (reshapes, transposes, concatenations), so with
every kernel's base set to zero it maps the LoRA product ``(alpha / rank) A B`` of each adapted
layer to exactly the change of the Hugging Face tensor it feeds. That change is factored
again with an SVD: Keras' ``EinsumDense`` LoRA shares ``B`` across attention heads, so a
query adapter of rank ``r`` is, as a Hugging Face matrix, of rank up to ``heads * r``; each
module's own rank goes to ``rank_pattern`` (and ``alpha_pattern`` keeps the run's scale).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kithara_ops.errors import ConfigError

PEFT_FORMAT_VERSION = "0.17"
"""The PEFT release whose adapter folder layout ``write_adapter`` follows."""

_FAN_IN_FAN_OUT = {"GPT2Backbone"}
"""Families whose Hugging Face projections are ``Conv1D`` (weights stored ``(in, out)``)."""


def write_adapter(keras_model: Any, base_model: str, out: Path) -> Path:
    """Write the LoRA adapters of ``keras_model`` to ``out`` as a PEFT folder; return ``out``.

    Args:
      keras_model: a KerasHub causal LM with LoRA enabled and its trained adapters.
      base_model: the base's name for ``base_model_name_or_path`` (a Hub id or a folder).
      out: a new or empty folder.

    Raises:
      ConfigError: the model has no LoRA adapters, or KerasHub has no Hugging Face exporter
        for its family.
    """
    from safetensors.numpy import save_file

    backbone = getattr(keras_model, "backbone", None)
    adapted = lora_layers(keras_model)
    if not adapted:
        raise ConfigError(
            "The run trained no LoRA adapters, so it has no PEFT form: export the whole "
            "model with --format hf or --format keras-hub."
        )
    embeddings = sorted({layer.name for layer in adapted if not hasattr(layer, "lora_kernel_b")})
    if embeddings:
        raise ConfigError(
            f"LoRA on embedding layers ({', '.join(embeddings)}) has no PEFT form here: export "
            "with --format hf or --format keras-hub (merged), or adapt projections only."
        )
    weights_map = _hf_weights_map(backbone)
    rank = int(adapted[0].lora_rank)
    # Keras freezes only an adapted layer's kernel: its bias trains with the adapters.
    biased = any(getattr(layer, "bias", None) is not None for layer in adapted)
    alpha = float(adapted[0].lora_alpha)
    scale = alpha / rank
    fan_in_fan_out = type(backbone).__name__ in _FAN_IN_FAN_OUT
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    read, fed = adapter_deltas(backbone, adapted, weights_map)
    for name in sorted(fed):
        module, delta = name.removesuffix(".weight"), read[name]
        lora_b, lora_a = factor(delta.T if fan_in_fan_out else delta, scale, rank)
        tensors[f"base_model.model.{module}.lora_A.weight"] = lora_a
        tensors[f"base_model.model.{module}.lora_B.weight"] = lora_b
        if f"{module}.bias" in read and biased:
            tensors[f"base_model.model.{module}.bias"] = read[f"{module}.bias"]
        if lora_a.shape[0] != rank:
            rank_pattern[module] = int(lora_a.shape[0])
            alpha_pattern[module] = scale * lora_a.shape[0]
    out.mkdir(parents=True, exist_ok=True)
    targets = sorted({key.split(".")[-3] for key in tensors if ".lora_" in key})
    config = adapter_config(base_model, rank, alpha, targets, fan_in_fan_out)
    config.update(
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        bias="lora_only" if biased else "none",
    )
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def adapter_config(
    base_model: str, rank: int, alpha: float, targets: list[str], fan_in_fan_out: bool
) -> dict[str, Any]:
    """PEFT's ``LoraConfig`` for an inference adapter, as ``adapter_config.json`` holds it."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
    }


def factor(delta: np.ndarray, scale: float, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``(B, A)`` with ``scale * B @ A == delta``, of the smallest rank that holds ``delta``.

    ``delta = U S Vᵀ`` (in float64); singular values below NumPy's ``matrix_rank`` tolerance
    (``S.max() * max(shape) * eps`` of float32) are float32 rounding and are dropped. An
    all-zero ``delta`` (adapters never trained) gives zero factors of ``rank``.
    """
    exact = np.asarray(delta, np.float64)
    u, s, vt = np.linalg.svd(exact, full_matrices=False)
    kept = int(np.sum(s > s.max(initial=0.0) * max(exact.shape) * np.finfo(np.float32).eps))
    if kept == 0:
        return np.zeros((exact.shape[0], rank), np.float32), np.zeros(
            (rank, exact.shape[1]), np.float32
        )
    root = np.sqrt(s[:kept] / scale)
    return (u[:, :kept] * root).astype(np.float32), (root[:, None] * vt[:kept]).astype(np.float32)


def adapter_deltas(
    backbone: Any, adapted: list[Any], weights_map: Any
) -> tuple[dict[str, np.ndarray], set[str]]:
    """The Hugging Face weights with every projection's base kernel at zero, and the names
    of the tensors the adapters feed: for those, the change the adapters make.

    Each kernel-fed tensor read that way is the LoRA product alone (biases and norms are
    read as they are); a second read with ``B`` shifted finds the tensors the adapters feed
    even where the trained product is zero. The kernels are put back after.
    """
    kernels = [layer for layer in _layers(backbone) if hasattr(layer, "_kernel")]
    saved = {id(layer): np.asarray(layer._kernel.value) for layer in kernels}
    saved_b = {id(layer): np.asarray(layer.lora_kernel_b.value) for layer in adapted}
    try:
        for layer in kernels:
            layer._kernel.assign(np.zeros_like(saved[id(layer)]))
        with merged_lora(adapted):
            deltas = _read(weights_map)
        for layer in adapted:
            layer.lora_kernel_b.assign(saved_b[id(layer)] + 1.0)
        with merged_lora(adapted):
            probe = _read(weights_map)
    finally:
        for layer in kernels:
            layer._kernel.assign(saved[id(layer)])
        for layer in adapted:
            layer.lora_kernel_b.assign(saved_b[id(layer)])
    fed = {name for name in deltas if not np.array_equal(deltas[name], probe[name])}
    return deltas, fed


@contextlib.contextmanager
def merged_lora(adapted: list[Any]) -> Iterator[None]:
    """Within: each adapted layer's stored kernel is its merged one, ``W + (alpha / rank) A B``,
    with LoRA switched off; after: as before.

    KerasHub's Hugging Face exporters read a projection either as ``layer.kernel`` (merged
    by Keras) or as ``layer.weights[0]`` (the stored base: keras-hub 0.32's Gemma exporter),
    and only with the product stored in the kernel do both give the trained weights.
    """
    saved = {}
    try:
        for layer in adapted:
            merged = np.asarray(layer.kernel)
            saved[id(layer)] = np.asarray(layer._kernel.value)
            layer.lora_enabled = False
            layer._kernel.assign(merged)
        yield
    finally:
        for layer in adapted:
            if id(layer) in saved:
                layer._kernel.assign(saved[id(layer)])
                layer.lora_enabled = True


def lora_layers(model: Any) -> list[Any]:
    """The layers of ``model``'s backbone with LoRA enabled (none without a backbone)."""
    return [
        layer
        for layer in _layers(getattr(model, "backbone", None))
        if getattr(layer, "lora_enabled", False)
    ]


def _read(weights_map: Any) -> dict[str, np.ndarray]:
    """The weights map evaluated now, as float32 NumPy arrays."""
    return {name: np.asarray(value, np.float32) for name, value in weights_map().items()}


def _hf_weights_map(backbone: Any) -> Any:
    """A function giving KerasHub's Hugging Face weights map of ``backbone`` when called."""
    try:
        from keras_hub.src.utils.transformers.export.hf_exporter import MODEL_EXPORTERS
    except ImportError:  # a KerasHub without Hugging Face export
        MODEL_EXPORTERS = {}
    family = type(backbone).__name__
    if family not in MODEL_EXPORTERS:
        known = ", ".join(sorted(MODEL_EXPORTERS)) or "none in this KerasHub"
        raise ConfigError(
            f"KerasHub has no Hugging Face exporter for {family} (it has: {known}), so its "
            "adapters have no Hugging Face names: use --format keras-hub."
        )
    exporter = MODEL_EXPORTERS[family]
    return lambda: {
        name: value.value if hasattr(value, "value") else value
        for name, value in exporter(backbone, include_lm_head=False).items()
    }


def _layers(backbone: Any) -> list[Any]:
    """Every layer under ``backbone`` (none without one)."""
    return list(backbone._flatten_layers()) if backbone is not None else []
