"""Models: a built-in decoder-only transformer and resolution of a run's ``model`` spec.

``resolve_model("tiny", vocab_size=..., seq_len=...)`` builds a built-in size;
``resolve_model("my_pkg.models:build", ...)`` calls a user factory returning a
``keras.Model``; ``from_preset(handle, lora_rank=...)`` loads a KerasHub preset or Hugging
Face folder as a causal LM. ``layout_rules_of(model)`` gives the FSDP partition rules a model
declares; ``adapt_model(model)`` says how a batch feeds it (the step's one model contract);
``tiny_preset(family, folder)`` writes a tiny offline preset to try things on.
"""

from kithara_ops._backend import require_jax_backend

# Must run before the submodules below import Keras, which fixes its backend at import.
require_jax_backend()

from kithara_ops.models.adapter import ModelAdapter, adapt_model  # noqa: E402
from kithara_ops.models.hub import fingerprint, from_preset, preset_tokenizer  # noqa: E402
from kithara_ops.models.registry import (  # noqa: E402
    SIZES,
    LayoutRules,
    TransformerSize,
    causal_lm,
    layout_rules_of,
    resolve_model,
)
from kithara_ops.models.rotary import apply_rotary_embedding  # noqa: E402
from kithara_ops.models.tiny_presets import tiny_preset  # noqa: E402
from kithara_ops.models.transformer import (  # noqa: E402
    CausalLM,
    CausalSelfAttention,
    DecoderBlock,
    GatedMLP,
)

__all__ = [
    "SIZES",
    "CausalLM",
    "CausalSelfAttention",
    "DecoderBlock",
    "GatedMLP",
    "LayoutRules",
    "ModelAdapter",
    "TransformerSize",
    "adapt_model",
    "apply_rotary_embedding",
    "causal_lm",
    "fingerprint",
    "from_preset",
    "layout_rules_of",
    "preset_tokenizer",
    "resolve_model",
    "tiny_preset",
]
