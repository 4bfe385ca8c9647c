"""Tiny KerasHub presets for the tests: ``kithara_ops.models.tiny_presets``, under the names
the tests use."""

from kithara_ops.models.tiny_presets import (  # noqa: F401
    _TEXT,
    FAMILIES,
    VOCAB_SIZE,
    bpe_vocabulary,
    build_causal_lm,
    sentencepiece_proto,
)
from kithara_ops.models.tiny_presets import tiny_preset as build_preset  # noqa: F401
