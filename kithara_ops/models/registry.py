"""Built-in model sizes and turning a run's ``model`` string into a built ``keras.Model``."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
import sys
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from kithara_ops.errors import ConfigError
from kithara_ops.models.hub import enable_lora, from_preset, is_preset
from kithara_ops.models.transformer import CausalLM

LayoutRules = list[tuple[str, tuple[str | None, ...]]]
"""``(variable path regex, partition spec)`` pairs, as returned by ``get_layout_rules()``."""

_DOTTED_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclasses.dataclass(frozen=True)
class TransformerSize:
    """Shape of a built-in ``CausalLM``.

    Attributes:
        d_model: Residual stream width ``D``; a multiple of 8 so FSDP can shard it.
        num_layers: Number of decoder blocks.
        num_heads: Attention heads; ``D / num_heads`` must be an even integer (rotary).
        mlp_dim: Hidden width of each gated MLP.
    """

    d_model: int
    num_layers: int
    num_heads: int
    mlp_dim: int

    def __post_init__(self) -> None:
        if self.d_model % 8:
            raise ValueError(f"d_model must be a multiple of 8, got {self.d_model}.")
        if self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2:
            raise ValueError(
                f"d_model {self.d_model} must split into {self.num_heads} heads of even width."
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``d_model // num_heads``."""
        return self.d_model // self.num_heads


SIZES: dict[str, TransformerSize] = {
    # About 1.1M parameters at vocab 259: trains in minutes on a CPU.
    "tiny": TransformerSize(d_model=128, num_layers=4, num_heads=4, mlp_dim=512),
    # About 14.4M parameters at vocab 259: big enough for sharding to matter.
    "small": TransformerSize(d_model=384, num_layers=8, num_heads=6, mlp_dim=1024),
}
"""Built-in model sizes by name."""


def causal_lm(
    size: str = "tiny",
    *,
    vocab_size: int = 259,
    seq_len: int = 256,
    dtype: str | None = None,
    dropout: float = 0.0,
    name: str = "causal_lm",
) -> keras.Model:
    """Build a built-in ``CausalLM`` with its variables created.

    Initial values come from Keras' global RNG, so calling
    ``keras.utils.set_random_seed(seed)`` first makes them reproducible.

    Args:
        size: A key of ``SIZES``.
        vocab_size: Vocabulary size (output logits per position).
        seq_len: Sequence length the model is built for (rotary positions work at any length).
        dtype: Keras dtype policy name, e.g. ``"mixed_bfloat16"``; ``None`` for the default.
        dropout: Residual dropout rate inside each block.
        name: Model name, the first component of every variable path.

    Returns:
        The built model.

    Raises:
        ConfigError: ``size`` is not a built-in size.
    """
    if size not in SIZES:
        raise ConfigError(
            f"Unknown model size {size!r}: choose one of {', '.join(SIZES)}"
            f"{_did_you_mean(size)}, or give a 'package.module:function' spec."
        )
    shape = SIZES[size]
    model = CausalLM(
        vocab_size=vocab_size,
        d_model=shape.d_model,
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        mlp_dim=shape.mlp_dim,
        dropout=dropout,
        dtype=dtype,
        name=name,
    )
    model.build((None, seq_len))
    return model


def resolve_model(
    spec: str,
    *,
    vocab_size: int,
    seq_len: int,
    dtype: str | None = None,
    lora_rank: int | None = None,
    lora_targets: str | None = None,
    lora_alpha: float | None = None,
    quantize: str | None = None,
    mesh: Any = None,
    min_shard_size: int = 4096,
) -> keras.Model:
    """Turn a model spec into a built ``keras.Model``.

    Args:
        spec: A built-in size name (``tiny``, ``small``), a KerasHub preset (a preset or
            Hugging Face folder, a ``kaggle://`` / ``hf://`` handle or a KerasHub preset
            name; see ``kithara_ops.models.hub.from_preset``) or ``"package.module:function"``.
            The function is called with those of ``vocab_size``, ``seq_len`` and ``dtype``
            that its signature accepts (all three if it takes ``**kwargs``) and must return
            a ``keras.Model``; a model without variables yet is built by calling it on a
            ``(1, seq_len)`` int32 batch of zeros.
        vocab_size: Vocabulary size of the data.
        seq_len: Tokens per training sequence.
        dtype: Keras dtype policy name, or ``None`` for the default.
        lora_rank: Enable LoRA of this rank on the model's KerasHub backbone.
        lora_targets: Comma-separated layer names for LoRA; ``None``: KerasHub's defaults.
        lora_alpha: LoRA's scale is ``lora_alpha / lora_rank``; ``None``: the rank.
        quantize: ``int8`` or ``int4``: a preset's base quantized before LoRA (QLoRA).
        mesh: The run's mesh: a preset's weights are loaded straight into their shardings
            on it (``from_preset``); other models are built as they are.
        min_shard_size: The run's ``min_shard_size``, for that placement.

    Returns:
        The built model.

    Raises:
        ConfigError: The spec is malformed, names an unknown size, a module that cannot be
            imported or a missing function, or the function returns something else than a
            ``keras.Model``.
    """
    # A near miss of a built-in size is a typo to report, not a KerasHub name to look up.
    if spec not in SIZES and not _did_you_mean(spec) and is_preset(spec):
        # The run's precision decides, not the dtype a preset was saved in (often bfloat16).
        dtype = dtype or "float32"
        model = from_preset(
            spec, dtype=dtype, mesh=mesh, min_shard_size=min_shard_size, quantize=quantize
        )
    else:
        if quantize not in (None, "none"):
            raise ConfigError(
                f"quantize {quantize!r} applies to a KerasHub preset's base, and {spec!r} is "
                "not one: drop --quantize."
            )
        model = _build(spec, vocab_size=vocab_size, seq_len=seq_len, dtype=dtype)
    if lora_rank is not None:
        enable_lora(model, lora_rank, lora_targets, lora_alpha)
    return model


def _build(spec: str, *, vocab_size: int, seq_len: int, dtype: str | None) -> keras.Model:
    """The built-in or factory model ``spec`` names, built (see ``resolve_model``)."""
    if ":" not in spec:
        if spec in SIZES:
            return causal_lm(spec, vocab_size=vocab_size, seq_len=seq_len, dtype=dtype)
        if not _DOTTED_NAME.match(spec):
            raise _malformed(spec)
        raise ConfigError(
            f"Unknown model size {spec!r}: choose one of {', '.join(SIZES)}"
            f"{_did_you_mean(spec)}, or give a 'package.module:function' spec."
        )
    module_name, _, attr = spec.partition(":")
    if not (_DOTTED_NAME.match(module_name) and _DOTTED_NAME.match(attr)):
        raise _malformed(spec)
    factory = _load_factory(spec, module_name, attr)
    model = factory(
        **_accepted_kwargs(factory, vocab_size=vocab_size, seq_len=seq_len, dtype=dtype)
    )
    if not isinstance(model, keras.Model):
        raise ConfigError(
            f"Model factory {spec!r} returned {type(model).__module__}.{type(model).__qualname__}, "
            "not a keras.Model: return the model itself."
        )
    if not model.variables:
        # Subclassed models create their variables on first call.
        model(np.zeros((1, seq_len), dtype="int32"))
    return model


def output_vocab_size(model: keras.Model, seq_len: int) -> int | None:
    """The vocabulary a model predicts: the last dimension of its logits, without computing them.

    The output's shape comes from ``jax.eval_shape`` on a ``(1, seq_len)`` int32 batch, which
    traces the model once but runs nothing on the devices.

    Args:
        model: A built model mapping token ids ``(batch, seq)`` to logits, fed through its
            ``kithara_ops.models.adapter`` (one array, or KerasHub's named inputs).
        seq_len: Tokens per sequence.

    Returns:
        The last dimension of the output, or ``None`` when the output is not one
        ``(batch, seq, vocab)`` array of known size (nothing to check then).
    """
    import jax

    from kithara_ops.models.adapter import adapt_model

    adapter = adapt_model(model)  # a model it cannot feed is refused here, in one line

    def forward(batch):
        return adapter.logits(model(adapter.inputs(batch)))

    try:
        out = jax.eval_shape(forward, {"x": jax.ShapeDtypeStruct((1, seq_len), np.int32)})
    except Exception:  # a model that cannot be traced this way is checked by the step itself
        return None
    shape = getattr(out, "shape", None)
    if shape is None or len(shape) != 3 or not isinstance(shape[-1], int):
        return None
    return int(shape[-1])


def layout_rules_of(model: keras.Model) -> LayoutRules:
    """The model's FSDP layout rules (``model.get_layout_rules()``), or ``[]`` if it has none.

    Args:
        model: Any Keras model.

    Returns:
        ``(path regex, partition spec)`` pairs; an empty list means "no opinion".
    """
    get_rules = getattr(model, "get_layout_rules", None)
    if not callable(get_rules):
        return []
    return [(str(pattern), tuple(spec)) for pattern, spec in get_rules()]


def _load_factory(spec: str, module_name: str, attr: str) -> Callable[..., Any]:
    """Import and check the factory a spec names, without calling it.

    A model spec runs code, so only a user's own factory qualifies: not a standard-library
    or builtin module, not a function that module merely imported from elsewhere, not a class
    that is no ``keras.Model``, not a function annotated to return something else.
    """
    root = module_name.split(".")[0]
    if root in sys.stdlib_module_names or root in sys.builtin_module_names:
        raise ConfigError(
            f"Model spec {spec!r} names the standard-library module {root!r}: a model factory "
            "is your own function returning a keras.Model, e.g. my_models:build."
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # Only a missing spec module (or a parent package) means "not installed"; a missing
        # dependency of that module is reported as such.
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise ConfigError(
                f"Cannot import module {module_name!r} of model spec {spec!r}: "
                "is it installed / on PYTHONPATH?"
            ) from None
        raise ConfigError(
            f"Importing module {module_name!r} of model spec {spec!r} failed: {err}"
        ) from err
    except ImportError as err:
        raise ConfigError(
            f"Importing module {module_name!r} of model spec {spec!r} failed: {err}"
        ) from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(
                f"Module {module_name!r} has no attribute {attr!r} (model spec {spec!r}): "
                "check the function name after the ':'."
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(
            f"{spec!r} is a {type(obj).__name__}, not a function returning a keras.Model."
        )
    _check_factory(spec, root, obj)
    return obj


def _check_factory(spec: str, root: str, factory: Any) -> None:
    """Refuse a callable that cannot be a model factory, before it is called."""
    defined_in = getattr(factory, "__module__", None) or ""
    if defined_in.split(".")[0] != root:
        raise ConfigError(
            f"Model spec {spec!r} names {defined_in or 'a builtin'}'s "
            f"{getattr(factory, '__name__', 'callable')}, which the module only imported: "
            "name a factory defined in your own package."
        )
    if inspect.isclass(factory):
        if not issubclass(factory, keras.Model):
            raise ConfigError(
                f"Model spec {spec!r} names the class {factory.__qualname__}, which is not a "
                "keras.Model: name a keras.Model subclass or a function returning one."
            )
        return
    try:
        returns = inspect.signature(factory).return_annotation
    except (TypeError, ValueError):
        return
    known = inspect.isclass(returns) and returns is not inspect.Signature.empty
    if known and not issubclass(returns, keras.Model):
        raise ConfigError(
            f"Model spec {spec!r} is annotated to return {returns.__qualname__}, not a "
            "keras.Model: name a function that returns the model."
        )


def _accepted_kwargs(fn: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        # No introspectable signature (some C callables): offer everything.
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return kwargs
    named = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return {key: value for key, value in kwargs.items() if key in named}


def _malformed(spec: str) -> ConfigError:
    return ConfigError(
        f"Malformed model spec {spec!r}: expected a built-in size ({', '.join(SIZES)}) "
        "or 'package.module:function'."
    )


def _did_you_mean(value: str) -> str:
    close = difflib.get_close_matches(value, SIZES, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
