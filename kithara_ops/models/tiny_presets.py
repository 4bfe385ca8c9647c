"""Tiny KerasHub causal LMs built from config, with tokenizers made offline, as preset folders.

For trying things without downloading anything: ``tiny_preset("gemma", "presets")`` writes
``presets/gemma``, a folder ``--model`` and ``models.from_preset`` load like any preset.

Each family gets 2 layers, a hidden width of 32 and a vocabulary of a few hundred tokens, so
that it compiles in seconds. GPT-2 and Qwen get a byte-level BPE vocabulary (every byte, as
GPT-2 maps bytes to printable characters, plus a few merges); Llama, Gemma and Mistral get a
SentencePiece model trained here on a few KB of text. Every folder is written with KerasHub's
own ``save_to_preset``, so ``keras_hub.models.CausalLM.from_preset(folder)`` loads it.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import keras

from kithara_ops._backend import seed_keras
from kithara_ops.errors import ConfigError

FAMILIES = ("gpt2", "llama", "gemma", "qwen", "mistral")
"""The families ``build_preset`` knows."""

VOCAB_SIZE = 320
"""Tokens in every tiny preset's vocabulary: the ids of byte-tokenized text (< 259) fit."""

_TEXT = (
    "The quick brown fox jumps over the lazy dog. A small model learns to predict the next "
    "token of a sentence. Training runs on many devices, and each one holds a shard of the "
    "weights. Low rank adapters change a few parameters while the base model stays frozen. "
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (its published scheme)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def bpe_vocabulary(special: str) -> tuple[dict[str, int], list[str]]:
    """A byte-level BPE vocabulary of ``VOCAB_SIZE`` tokens and its merges.

    Id 0 is ``special`` (GPT-2's and Qwen's end-of-text, also their padding id); the 256
    byte characters follow; the rest are merges of frequent pairs of the sample text.
    """
    byte_chars = list(_bytes_to_unicode().values())
    vocabulary = {special: 0}
    for char in byte_chars:
        vocabulary[char] = len(vocabulary)
    encode = _bytes_to_unicode()
    words = [
        "".join(encode[b] for b in (" " + w).encode()) for w in _TEXT.split()
    ]  # GPT-2 marks a leading space as part of the word
    merges = []
    while len(vocabulary) < VOCAB_SIZE:
        pairs: dict[tuple[str, str], int] = {}
        split = [_split(w, vocabulary) for w in words]
        for parts in split:
            for pair in itertools.pairwise(parts):
                pairs[pair] = pairs.get(pair, 0) + 1
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(f"{best[0]} {best[1]}")
        vocabulary[best[0] + best[1]] = len(vocabulary)
    return vocabulary, merges


def _split(word: str, vocabulary: dict[str, int]) -> list[str]:
    """``word`` split greedily into the longest tokens of ``vocabulary``."""
    parts, start = [], 0
    while start < len(word):
        end = len(word)
        while end > start + 1 and word[start:end] not in vocabulary:
            end -= 1
        parts.append(word[start:end])
        start = end
    return parts


def sentencepiece_proto(pad: str, bos: str, eos: str) -> bytes:
    """A SentencePiece model of ``VOCAB_SIZE`` pieces trained on a few KB of sample text."""
    import sentencepiece

    model = io.BytesIO()
    sentences = [f"{_TEXT} {i}" for i in range(40)] + _TEXT.split(". ")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=VOCAB_SIZE,
        model_type="bpe",
        byte_fallback=True,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece=pad,
        bos_piece=bos,
        eos_piece=eos,
        character_coverage=1.0,
        minloglevel=2,
    )
    return model.getvalue()


def build_causal_lm(family: str, seed: int = 0) -> keras.Model:
    """A tiny KerasHub ``CausalLM`` of ``family`` with its preprocessor, seeded weights.

    Seeds Keras' global random state with ``seed`` (``keras.utils.set_random_seed``).
    """
    from kithara_ops.models.hub import require_keras_hub

    hub = require_keras_hub().models
    seed_keras(seed)
    shape = dict(vocabulary_size=VOCAB_SIZE, num_layers=2, hidden_dim=32, intermediate_dim=64)
    if family == "gpt2":
        vocabulary, merges = bpe_vocabulary("<|endoftext|>")
        tokenizer = hub.GPT2Tokenizer(vocabulary=vocabulary, merges=merges)
        backbone = hub.GPT2Backbone(num_heads=4, dropout=0.0, max_sequence_length=128, **shape)
        preprocessor = hub.GPT2CausalLMPreprocessor(tokenizer, sequence_length=32)
        return hub.GPT2CausalLM(backbone, preprocessor)
    if family == "qwen":
        vocabulary, merges = bpe_vocabulary("<|endoftext|>")
        tokenizer = hub.QwenTokenizer(vocabulary=vocabulary, merges=merges)
        backbone = hub.QwenBackbone(num_query_heads=4, num_key_value_heads=2, **shape)
        preprocessor = hub.QwenCausalLMPreprocessor(tokenizer, sequence_length=32)
        return hub.QwenCausalLM(backbone, preprocessor)
    if family == "llama":
        tokenizer = hub.LlamaTokenizer(proto=sentencepiece_proto("<pad>", "<s>", "</s>"))
        backbone = hub.LlamaBackbone(num_query_heads=4, num_key_value_heads=2, **shape)
        preprocessor = hub.LlamaCausalLMPreprocessor(tokenizer, sequence_length=32)
        return hub.LlamaCausalLM(backbone, preprocessor)
    if family == "mistral":
        tokenizer = hub.MistralTokenizer(proto=sentencepiece_proto("<pad>", "<s>", "</s>"))
        backbone = hub.MistralBackbone(num_query_heads=4, num_key_value_heads=2, **shape)
        preprocessor = hub.MistralCausalLMPreprocessor(tokenizer, sequence_length=32)
        return hub.MistralCausalLM(backbone, preprocessor)
    if family == "gemma":
        tokenizer = hub.GemmaTokenizer(proto=sentencepiece_proto("<pad>", "<bos>", "<eos>"))
        backbone = hub.GemmaBackbone(num_query_heads=4, num_key_value_heads=2, head_dim=8, **shape)
        preprocessor = hub.GemmaCausalLMPreprocessor(tokenizer, sequence_length=32)
        return hub.GemmaCausalLM(backbone, preprocessor)
    raise ConfigError(
        f"Unknown tiny preset family {family!r}: choose one of {', '.join(FAMILIES)}."
    )


def tiny_preset(family: str, directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny ``family`` preset to ``directory/family`` and return that folder.

    Two layers, a hidden width of 32 and a vocabulary of ``VOCAB_SIZE`` tokens: it compiles
    in seconds, and nothing is downloaded. Written with KerasHub's own ``save_to_preset``.

    Args:
      family: one of ``FAMILIES`` (``gpt2``, ``llama``, ``gemma``, ``qwen``, ``mistral``).
      directory: where the folder goes (created if missing).
      seed: the weights' seed.

    Example:
      >>> from kithara_ops import models  # doctest: +SKIP
      >>> folder = models.tiny_preset("gemma", "presets")  # doctest: +SKIP
      >>> model = models.from_preset(str(folder), lora_rank=4)  # doctest: +SKIP
    """
    folder = Path(directory) / family
    build_causal_lm(family, seed).save_to_preset(str(folder))
    return folder
