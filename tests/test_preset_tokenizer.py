"""A model preset's own tokenizer turns text into the ids a run trains on.

The presets are tiny KerasHub models built from config with tokenizers made here, offline:
a SentencePiece model trained on a few KB of text (Gemma) and a byte-level BPE vocabulary
(GPT-2), each written with ``save_to_preset`` into a temporary folder.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

from kithara_ops import data  # noqa: E402
from kithara_ops.data import ByteTokenizer, PresetTokenizer  # noqa: E402
from kithara_ops.errors import ConfigError  # noqa: E402

TEXT = ("the quick brown fox jumps over the lazy dog. " * 3 + "pack my box with jugs. ") * 40


def sentencepiece_proto(vocab_size: int = 64) -> bytes:
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.split(". ")), model_writer=out, vocab_size=vocab_size,
        model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
        eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", character_coverage=1.0,
        minloglevel=2,
    )  # fmt: skip
    return out.getvalue()


def byte_level_bpe() -> tuple[dict[str, int], list[str]]:
    """A GPT-2 style vocabulary: every character of TEXT ('Ġ' for a space) and two merges."""
    chars = sorted({"Ġ" if c == " " else c for c in TEXT})
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    merges = ["t h", "th e"]
    for piece in ("th", "the"):
        vocab[piece] = len(vocab)
    return vocab, merges


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    """Tiny Gemma and GPT-2 preset folders: ``{"gemma": path, "gpt2": path}``."""
    folders = {}
    gemma_tok = keras_hub.models.GemmaTokenizer(proto=sentencepiece_proto())
    gemma = keras_hub.models.GemmaBackbone(
        vocabulary_size=gemma_tok.vocabulary_size(), num_layers=1, num_query_heads=1,
        num_key_value_heads=1, hidden_dim=8, intermediate_dim=16, head_dim=8,
    )  # fmt: skip
    vocab, merges = byte_level_bpe()
    gpt2_tok = keras_hub.models.GPT2Tokenizer(vocabulary=vocab, merges=merges)
    gpt2 = keras_hub.models.GPT2Backbone(
        vocabulary_size=len(vocab), num_layers=1, num_heads=1, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=64,
    )  # fmt: skip
    for name, backbone, tokenizer in (("gemma", gemma, gemma_tok), ("gpt2", gpt2, gpt2_tok)):
        folder = tmp_path_factory.mktemp(name)
        backbone.save_to_preset(str(folder))
        tokenizer.save_to_preset(str(folder))
        folders[name] = folder
    return folders


@pytest.mark.parametrize("family", ["gemma", "gpt2"])
def test_a_preset_folder_gives_its_own_tokenizer(presets, family):
    tokenizer = data.load_tokenizer(str(presets[family]))
    assert isinstance(tokenizer, PresetTokenizer)
    own = keras_hub.tokenizers.Tokenizer.from_preset(str(presets[family]))
    ids = tokenizer.encode("the lazy fox")
    np.testing.assert_array_equal(ids, np.asarray(own.tokenize("the lazy fox")))
    assert ids.dtype == np.int32 and len(ids) > 0
    assert tokenizer.vocab_size == own.vocabulary_size()
    assert (tokenizer.bos_id, tokenizer.eos_id) == (own.start_token_id, own.end_token_id)
    assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id]).strip() == "the lazy fox"


def test_auto_is_the_presets_tokenizer_and_bytes_for_built_in_models(presets):
    assert isinstance(data.run_tokenizer("auto", "tiny"), ByteTokenizer)
    assert isinstance(data.run_tokenizer("auto", "my_models:build"), ByteTokenizer)
    assert isinstance(data.run_tokenizer("byte", str(presets["gemma"])), ByteTokenizer)
    chosen = data.run_tokenizer("auto", str(presets["gemma"]))
    assert isinstance(chosen, PresetTokenizer) and chosen.vocab_size == 64
    other = data.run_tokenizer(str(presets["gpt2"]), str(presets["gemma"]))
    assert type(other.tokenizer).__name__ == "GPT2Tokenizer"


def test_a_keras_hub_tokenizer_object_loads_data(presets, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    own = keras_hub.tokenizers.Tokenizer.from_preset(str(presets["gemma"]))
    dataset = data.load(str(corpus), seq_len=16, batch_size=2, tokenizer=own, shuffle=False)
    batch = next(iter(dataset))
    stream = np.concatenate([[own.start_token_id], own.tokenize(TEXT), [own.end_token_id]])
    np.testing.assert_array_equal(batch["x"][0], stream[:16])
    np.testing.assert_array_equal(batch["y"][0], stream[1:17])
    assert batch["x"].max() < own.vocabulary_size()


def test_prompt_tokens_carry_no_loss_with_a_preset_tokenizer(presets, tmp_path):
    tokenizer = data.load_tokenizer(str(presets["gpt2"]))
    records = tmp_path / "pairs.jsonl"
    records.write_text(json.dumps({"prompt": "the quick", "completion": " brown fox"}) + "\n")
    packed = data.pack(data.read_documents(str(records)), tokenizer, seq_len=64)
    prompt, completion = tokenizer.encode("the quick"), tokenizer.encode(" brown fox")
    # GPT-2 starts and ends a document with the same token: [bos] prompt completion [eos].
    n = 1 + len(prompt) + len(completion) + 1
    np.testing.assert_array_equal(packed.x[0, : n - 1], np.concatenate([[0], prompt, completion]))
    expected = np.zeros(64, np.float32)
    expected[len(prompt) : n - 1] = 1.0  # the completion's tokens and the end token
    np.testing.assert_array_equal(packed.mask[0], expected)
    assert (packed.x[0, n - 1 :] == tokenizer.pad_id).all()


def test_bad_tokenizers_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="neither 'byte' nor a preset folder") as err:
        data.load_tokenizer(str(tmp_path / "missing"))
    assert "\n" not in str(err.value)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nothing-known"}))
    with pytest.raises(ConfigError, match="No tokenizer could be loaded from") as err:
        data.load_tokenizer(str(tmp_path))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="must be a KerasHub tokenizer"):
        data.load("synthetic", seq_len=8, batch_size=2, tokenizer=object())


def test_the_cli_refuses_a_tokenizer_it_cannot_load_in_one_line(tmp_path):
    """A real process: stderr holds that line and nothing else (no library start-up output)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    done = subprocess.run(
        [sys.executable, "-m", "kithara_ops.cli", "train", "--no-tracking", "--steps", "1",
         "--tokenizer", str(tmp_path / "nowhere")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"Error: --tokenizer {str(tmp_path / 'nowhere')!r} is neither 'byte' nor a preset folder "
        "(a folder with a config.json, written by save_to_preset or from Hugging Face) nor a "
        "hub handle."
    ]
