"""KerasHub and Hugging Face models: load a preset as a trainable causal LM, with LoRA.

A preset is what ``keras_hub.models.CausalLM.from_preset`` loads: a local KerasHub preset
folder (``save_to_preset`` output), a local Hugging Face folder (``config.json`` with a
``model_type`` and ``*.safetensors``: KerasHub's own converter reads it for the families it
supports), or a handle (``kaggle://...``, ``hf://...``, a KerasHub preset name) that KerasHub
downloads. KerasHub is the optional extra ``hub`` and is imported only here, when a preset
is asked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import keras
import numpy as np

from kithara_ops.errors import ConfigError
from kithara_ops.sharding import LayoutRule, as_layout_rules, parameter_spec

HANDLE_SCHEMES = ("kaggle://", "hf://", "gs://", "modelscope://")
"""Handle prefixes KerasHub resolves (it needs the network for them)."""

_WEIGHT_PATTERNS = ("*.weights.h5", "*.safetensors", "*.safetensors.index.json")
_FINGERPRINT_SAMPLE = 1 << 20  # bytes read at each end of a weights file
# What each model from ``from_preset`` was loaded from, for the run record and MLflow. Kept
# beside the model rather than on it: Keras tracks every attribute a model is given.
_BASES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def base_model_of(model: keras.Model) -> dict[str, Any] | None:
    """Where ``model`` came from, if ``from_preset`` loaded it, else ``None``.

    Returns:
      ``{"handle", "fingerprint", "lora_rank", "lora_targets", "lora_alpha"}``: the
      preset handle, the ``fingerprint`` of its files (``None`` for a remote handle), and
      the LoRA rank, adapted layer names and alpha (``None`` without LoRA).
    """
    base = _BASES.get(model)
    return dict(base) if base is not None else None


def same_base(saved: dict[str, Any] | None, current: dict[str, Any] | None) -> bool:
    """Whether two ``base_model_of`` records name the same weights (unknown counts as same).

    Fingerprints decide when both have one, so a preset folder that moved is still the same;
    otherwise the handles do.
    """
    if not saved or not current:
        return True
    if saved.get("fingerprint") and current.get("fingerprint"):
        return saved["fingerprint"] == current["fingerprint"]
    return saved.get("handle") == current.get("handle")


def require_keras_hub() -> Any:
    """``keras_hub``, or a one-line ``ConfigError`` naming the extra to install."""
    try:
        import keras_hub
    except ImportError:
        raise ConfigError(
            "KerasHub models need the optional extra 'hub': pip install 'kithara-ops[hub]'."
        ) from None
    return keras_hub


def is_preset(spec: str) -> bool:
    """Whether a ``--model`` spec names a preset: a folder with a ``config.json``, or a handle.

    A bare name that is no built-in size counts when KerasHub is installed and knows it.
    """
    if spec.startswith(HANDLE_SCHEMES):
        return True
    path = Path(spec).expanduser()
    if path.is_dir():
        return True
    if ":" in spec or "/" in spec:
        return False
    try:
        import keras_hub
    except ImportError:
        return False
    return spec in keras_hub.models.CausalLM.presets


def from_preset(
    handle: str,
    *,
    lora_rank: int | None = None,
    lora_targets: Sequence[str] | str | None = None,
    lora_alpha: float | None = None,
    quantize: str | None = None,
    seed: int | None = None,
    dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    layout_rules: Sequence[LayoutRule] | Any = (),
    min_shard_size: int = 4096,
) -> keras.Model:
    """A KerasHub causal LM from ``handle``, ready for ``Trainer``.

    The returned model is a ``keras_hub.models.CausalLM`` (its preprocessor and tokenizer
    attached); the Trainer feeds it ``token_ids`` and ``padding_mask`` and reads its logits.

    With a ``mesh``, every weight is created and loaded straight into the sharding the
    Trainer will give it (the same layout rules and ``min_shard_size``): KerasHub builds the
    model inside a Keras ``ModelParallel`` distribution whose layout is computed per variable,
    so initial values are made by a jit with sharded outputs and the preset's arrays are sent
    to each device as its slice only. No device ever holds a whole large weight.

    Args:
      handle: a local KerasHub preset folder, a local Hugging Face folder, or a KerasHub
        handle (``kaggle://``, ``hf://``, a preset name; these download).
      lora_rank: enable LoRA of this rank on the backbone (``backbone.enable_lora``): the
        base weights are frozen, only the adapters train. ``None``: every weight trains.
      lora_targets: layer names LoRA adapts (a list, or a comma-separated string);
        ``None``: KerasHub's defaults for the family; ``"all-linear"``: every projection.
      lora_alpha: the adapters' scale is ``lora_alpha / lora_rank``; ``None``: the rank.
      quantize: ``"int8"`` or ``"int4"``: quantize the backbone's weights (Keras'
        ``quantize``, abs-max per output channel) before LoRA is enabled, in the same
        sharded placement (QLoRA); ``None``: float weights.
      seed: draws LoRA's ``A`` matrices (``draw_lora``; ``B`` starts at zero), so that they
        do not depend on Keras' global random state. ``None``: the ``Trainer`` draws them
        from its own ``seed`` when it is made.
      dtype: a Keras dtype policy name for the weights and compute (e.g. ``"bfloat16"``,
        ``"mixed_bfloat16"``); ``None``: the preset's own.
      mesh: the run's ``(data, fsdp)`` mesh (``sharding.make_mesh``) to load into;
        ``None``: KerasHub's default placement (the default device).
      layout_rules: the run's layout rules (``[(regex, spec)]`` or a Keras ``LayoutMap``).
      min_shard_size: weights with fewer elements are replicated.

    Raises:
      ConfigError: KerasHub is not installed, the folder is not a preset of a causal LM, or
        the LoRA options do not apply to it.
    """
    hub = require_keras_hub()
    folder = Path(handle).expanduser()
    if not handle.startswith(HANDLE_SCHEMES) and folder.exists():
        _check_folder(folder)
        handle = str(folder)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    placement = _sharded_load(mesh, layout_rules, min_shard_size) if mesh else None
    try:
        with placement.scope() if placement else contextlib.nullcontext():
            model = hub.models.CausalLM.from_preset(handle, **kwargs)
            if quantize not in (None, "none"):
                with warnings.catch_warnings():  # "Dropout has no quantize method": none needed
                    warnings.simplefilter("ignore", UserWarning)
                    model.backbone.quantize(quantize)
    except (ValueError, FileNotFoundError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"KerasHub cannot load {handle!r} as a causal LM ({first}): pass a causal LM "
            "preset folder, a Hugging Face folder of a family KerasHub converts, or a handle."
        ) from None
    except TypeError as err:
        # Keras refuses a saved config whose parts name classes that do not fit together
        # (a task.json naming another backbone): nothing was built, the folder is wrong.
        if "could not be deserialized" not in str(err):
            raise
        raise ConfigError(
            f"KerasHub cannot build the model {_folder_classes(folder)} that {handle!r} "
            "describes: its task.json names classes that do not fit together; pass an "
            "unmodified preset folder (save_to_preset output)."
        ) from None
    _BASES[model] = {
        "handle": handle,
        "fingerprint": fingerprint(handle),
        "lora_rank": None,
        "lora_targets": None,
        "lora_alpha": None,
        "quantize": quantize if quantize not in (None, "none") else None,
    }
    if lora_rank is not None:
        enable_lora(model, lora_rank, lora_targets, lora_alpha)
        if seed is not None:
            draw_lora(model, seed)
            _LORA_SEEDED.add(model)
    return model


_LORA_SEEDED: weakref.WeakSet = weakref.WeakSet()
"""Models whose LoRA matrices ``from_preset`` drew from a seed it was given."""


def lora_seeded(model: keras.Model) -> bool:
    """Whether ``from_preset(..., seed=)`` drew ``model``'s LoRA matrices."""
    return model in _LORA_SEEDED


def draw_lora(model: keras.Model, seed: int) -> None:
    """Draw every LoRA ``A`` matrix of ``model.backbone`` again from ``seed``.

    Keras draws them (He uniform: ``U(-sqrt(6 / fan_in), sqrt(6 / fan_in))``) from its
    global random state when LoRA is enabled; here layer ``i`` (in the backbone's layer
    order) draws from ``SeedSequence([seed, i])``, so the matrices are a function of the
    seed alone. ``B`` stays zero, so the model's output is unchanged.
    """
    layers = [layer for layer in model.backbone._flatten_layers() if _lora_a(layer) is not None]
    for i, layer in enumerate(layers):
        variable = _lora_a(layer)
        derived = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        value = keras.initializers.HeUniform(seed=derived)(variable.shape, variable.dtype)
        # A variable a Keras distribution placed keeps its placement; any other takes the
        # value as Keras' own initializer would have left it (not committed to a device).
        placed = getattr(variable, "_layout", None) is not None
        variable.assign(jax.device_put(value, variable.value.sharding) if placed else value)


def _lora_a(layer: Any) -> Any:
    """A layer's LoRA ``A`` variable, ``None`` without LoRA."""
    return getattr(layer, "lora_kernel_a", None) if getattr(layer, "lora_enabled", False) else None


def _sharded_load(
    mesh: jax.sharding.Mesh, layout_rules: Any, min_shard_size: int
) -> keras.distribution.Distribution:
    """A Keras distribution placing each variable by the run's layout rules as it is made."""
    rules = as_layout_rules(layout_rules)
    device_mesh = keras.distribution.DeviceMesh(
        mesh.devices.shape, list(mesh.axis_names), mesh.devices.flatten()
    )

    class RunLayout(keras.distribution.ModelParallel):
        """``ModelParallel`` whose layouts come from a variable's path and shape, not a map."""

        def get_variable_layout(self, variable):
            if getattr(variable, "_layout", None) is not None:
                return variable._layout
            spec = parameter_spec(
                variable.path, tuple(variable.shape), rules, mesh.shape["fsdp"], min_shard_size
            )
            axes = [spec[d] if d < len(spec) else None for d in range(len(variable.shape))]
            return keras.distribution.TensorLayout(axes, device_mesh)

    layout_map = keras.distribution.LayoutMap(device_mesh)
    return RunLayout(layout_map=layout_map, batch_dim_name=mesh.axis_names[0])


ALL_LINEAR = "all-linear"
"""``lora_targets`` naming every dense projection of the backbone (as PEFT's option)."""


def enable_lora(
    model: keras.Model,
    rank: int,
    targets: Sequence[str] | str | None = None,
    alpha: float | None = None,
) -> list[str]:
    """Enable LoRA on ``model.backbone``; return the names of ``targets`` (by default
    KerasHub's list for the backbone) that name layers it adapted.

    Each adapted kernel becomes ``W + (alpha / rank) A B``; ``alpha`` defaults to the rank
    (a scale of 1, Keras' default). ``targets`` ``"all-linear"`` names every ``Dense`` and
    ``EinsumDense`` layer of the backbone (attention and feed-forward projections; the
    embeddings, and so a tied output head, stay frozen).

    Raises:
      ConfigError: ``rank`` is not positive, the model has no KerasHub backbone, or no layer
        matches ``targets``.
    """
    if isinstance(targets, str):
        targets = [name.strip() for name in targets.split(",") if name.strip()]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"lora_rank must be a positive integer, got {rank!r}.")
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(backbone, "enable_lora"):
        raise ConfigError(
            f"LoRA needs a KerasHub model with a backbone, and {model.name!r} has none: drop "
            "--lora-rank or pass a KerasHub preset."
        )
    if list(targets or ()) == [ALL_LINEAR]:
        names = sorted({layer.name for layer in _dense_layers(backbone)})
    else:
        names = list(targets) if targets else list(backbone.default_lora_layer_names())
    backbone.enable_lora(rank, target_layer_names=names)
    if alpha is not None:
        # KerasHub's enable_lora takes no alpha; each Keras layer keeps its own, read by its
        # kernel property, so setting it is what Layer.enable_lora(rank, lora_alpha) does.
        for layer in backbone._flatten_layers():
            if _lora_a(layer) is not None:
                layer.lora_alpha = float(alpha)
    if not backbone.trainable_variables:
        known = sorted({layer.name for layer in backbone._flatten_layers() if layer.weights})
        raise ConfigError(
            f"lora_targets {names} match no layer of {backbone.name!r}: choose among "
            f"{', '.join(known)}."
        )
    # KerasHub's default list spans families (query_dense, value_dense, query, value): the
    # names recorded are those of the layers really adapted.
    adapted = [name for name in names if name in _lora_layer_names(backbone)]
    if model in _BASES:
        _BASES[model].update(
            lora_rank=rank, lora_targets=",".join(adapted), lora_alpha=alpha or float(rank)
        )
    return adapted


def _dense_layers(backbone: Any) -> list[Any]:
    """The backbone's ``Dense`` and ``EinsumDense`` layers: its linear projections."""
    kinds = (keras.layers.Dense, keras.layers.EinsumDense)
    return [layer for layer in backbone._flatten_layers() if isinstance(layer, kinds)]


def _lora_layer_names(backbone: Any) -> set[str]:
    """Names of the backbone's layers that have LoRA enabled."""
    return {layer.name for layer in backbone._flatten_layers() if _lora_a(layer) is not None}


def preset_tokenizer(handle: str) -> Any:
    """The preset's own KerasHub tokenizer: the one its causal LM preprocessor loads.

    ``Tokenizer.from_preset`` picks among every tokenizer class of the backbone in set
    order, so for a Hugging Face Mistral folder it returns ``MistralTokenizer`` in one
    process and an empty ``MistralTekkenTokenizer`` in the next. The preprocessor names its
    tokenizer class, so asking it is deterministic; presets without one fall back.
    """
    hub = require_keras_hub()
    folder = Path(handle).expanduser()
    source = str(folder) if folder.exists() else handle
    try:
        return hub.models.CausalLMPreprocessor.from_preset(source).tokenizer
    except ValueError:  # no causal LM preprocessor for this backbone
        return hub.tokenizers.Tokenizer.from_preset(source)


def fingerprint(handle: str) -> str | None:
    """A short hash identifying a local preset's weights: its config and weights files.

    It reads ``config.json`` whole and, of each weights file, its name, size and first and
    last MiB: cheap for a 20 GB model, and any re-save or conversion changes it. A remote
    handle has no local files to read: ``None`` (the handle alone names it).
    """
    folder = Path(handle).expanduser()
    if handle.startswith(HANDLE_SCHEMES) or not folder.is_dir():
        return None
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    files = sorted({p for pattern in _WEIGHT_PATTERNS for p in folder.glob(pattern)})
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as stream:
            digest.update(stream.read(_FINGERPRINT_SAMPLE))
            stream.seek(max(size - _FINGERPRINT_SAMPLE, 0))
            digest.update(stream.read(_FINGERPRINT_SAMPLE))
    return digest.hexdigest()[:16]


def _folder_classes(folder: Path) -> str:
    """The classes a preset folder's ``task.json`` names (task, then its backbone), for
    messages; ``"(unknown)"`` when it names none."""
    try:
        task = json.loads((folder / "task.json").read_text(encoding="utf-8"))
        parts = [task, task.get("config", {}).get("backbone") or {}]
        names = [p.get("registered_name") or p.get("class_name") for p in parts]
    except (OSError, ValueError, AttributeError):
        names = []
    named = [str(n) for n in names if n]
    return f"{named[0]} (backbone {named[1]})" if len(named) == 2 else (named or ["(unknown)"])[0]


def _check_folder(folder: Path) -> None:
    """A local folder must hold a config KerasHub reads: say which file is missing."""
    config = folder / "config.json"
    if not config.is_file():
        raise ConfigError(
            f"{str(folder)!r} has no config.json: pass a KerasHub preset folder "
            "(save_to_preset output) or a Hugging Face model folder."
        )
    try:
        values = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{str(config)!r} is not readable JSON ({err}).") from None
    if "model_type" in values and not any(folder.glob("*.safetensors")):
        raise ConfigError(
            f"{str(folder)!r} is a Hugging Face folder without *.safetensors weights: "
            "KerasHub converts safetensors only (save the model with safe_serialization)."
        )
