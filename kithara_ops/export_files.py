"""What an exported folder carries beside the weights: the chat template the run trained
with, the family's stop tokens (``generation_config.json``), and ordinary file permissions.

A chat model is only usable with the template it was trained on, and a generator only stops
where the model was taught to stop: for Llama 3 chat that is ``<|eot_id|>`` (the end of a
turn), not the tokenizer's end id ``<|end_of_text|>``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kithara_ops.data.chat import TEMPLATE_FILE, read_template_file

TURN_ENDS = ("<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|im_end|>", "<|end|>")
"""Tokens that end a chat turn in the families that have one (Llama 3, Gemma, Qwen, Phi)."""


def template_digest(text: str) -> str:
    """SHA-256 of a template's text, 16 hex digits (as the data's digest)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def trained_template(tokenizer: Any) -> str | None:
    """The text of the chat template ``tokenizer`` renders chat data with, if it has one.

    ``tokenizer`` is a run's (``data.run_tokenizer``): its template came from the run's
    ``chat_template`` file or its model folder's own, and is read again from there.
    """
    chosen = getattr(tokenizer, "chat_template", None)
    return read_template_file(chosen.origin) if chosen is not None else None


def stop_ids(tokenizer: Any) -> list[int]:
    """The ids a generator stops at: the end id, then each turn end the vocabulary has."""
    pieces = getattr(tokenizer, "special_pieces", None) or {}
    ids = [] if tokenizer.eos_id is None else [int(tokenizer.eos_id)]
    return ids + [pieces[end] for end in TURN_ENDS if end in pieces and pieces[end] not in ids]


def generation_config(tokenizer: Any) -> dict[str, Any]:
    """``generation_config.json``'s token ids: ``eos_token_id`` is a list when the family
    has turn ends besides its end id (Hugging Face stops at any of them)."""
    stops = stop_ids(tokenizer)
    return {
        "bos_token_id": None if tokenizer.bos_id is None else int(tokenizer.bos_id),
        "eos_token_id": stops[0] if len(stops) == 1 else stops,
        "pad_token_id": int(tokenizer.pad_id),
    }


def write_chat_files(folder: Path, tokenizer: Any, template: str | None) -> None:
    """Add the chat template and the stop tokens to an exported ``folder``.

    The template goes to ``chat_template.jinja`` and, where the folder has a
    ``tokenizer_config.json`` (Hugging Face), to its ``chat_template`` key, the two places
    ``transformers`` reads it from. ``generation_config.json`` gets the token ids of
    ``generation_config``, keeping any other keys an exporter wrote.
    """
    if template is not None:
        (folder / TEMPLATE_FILE).write_text(template, encoding="utf-8")
        config_path = folder / "tokenizer_config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
            config["chat_template"] = template
            config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    path = folder / "generation_config.json"
    values = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    path.write_text(json.dumps({**values, **generation_config(tokenizer)}, indent=2))


def ordinary_permissions(folder: Path) -> None:
    """Give everything under ``folder`` the permissions a new file gets (the umask's).

    Some savers write files readable by their owner only (safetensors: 0600), which others
    sharing the export cannot read.
    """
    umask = os.umask(0)
    os.umask(umask)
    for root, _, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def hf_gaps(folder: Path) -> list[str]:
    """What a Hugging Face folder lacks that its loaders need, in words (empty: nothing).

    Read from ``config.json`` and the safetensors header alone: ``architectures`` (the model
    class a loader builds; KerasHub's own loader requires it), and key/value projections
    narrower than ``num_key_value_heads`` heads (an exporter that wrote only the first).
    """
    config_path = folder / "config.json"
    if not config_path.is_file():
        return ["config.json"]
    config = json.loads(config_path.read_text(encoding="utf-8"))
    gaps = []
    if not config.get("architectures"):
        gaps.append("config.json names no architectures (the model class a loader builds)")
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    head_dim = config.get("head_dim") or (config.get("hidden_size", 0) // heads if heads else None)
    if kv_heads and head_dim:
        for name, shape in _safetensors_shapes(folder / "model.safetensors").items():
            if name.endswith(("k_proj.weight", "v_proj.weight")) and shape[0] < kv_heads * head_dim:
                gaps.append(
                    f"{name} holds {shape[0] // head_dim} of the {kv_heads} key/value heads"
                )
                break
    return gaps


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """``{tensor name: shape}`` from a safetensors file's JSON header (no tensor is read)."""
    if not path.is_file():
        return {}
    with open(path, "rb") as stream:
        size = int.from_bytes(stream.read(8), "little")
        header = json.loads(stream.read(size))
    return {k: v["shape"] for k, v in header.items() if isinstance(v, dict) and "shape" in v}
