"""A model preset's own tokenizer, behind the interface packing uses.

KerasHub loads the tokenizer of a preset folder (``save_to_preset`` output), of a local
Hugging Face folder (``tokenizer.json`` and friends, converted by KerasHub) or of a preset
handle (``kaggle://...``, ``hf://...``, a built-in name; those need the network).
``PresetTokenizer`` gives it the ``ByteTokenizer`` interface: ``encode``, ``decode``,
``bos_id``, ``eos_id``, ``pad_id`` and ``vocab_size``, plus the special-token texts and
chat template that chat data (``kithara_ops.data.chat``) needs.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from kithara_ops.data.chat import ChatTemplate, folder_template, read_template_file
from kithara_ops.data.tokenizer import ByteTokenizer
from kithara_ops.errors import ConfigError, first_line


class PresetTokenizer:
    """A KerasHub tokenizer as packing uses it.

    Documents are framed ``[bos] + text + [eos]`` with the tokenizer's own start and end
    ids (no start id where the model family has none, as Qwen); padding uses its pad id.

    Attributes:
        tokenizer: the KerasHub tokenizer.
        handle: where it was loaded from, if it was loaded by ``load_tokenizer``.
        bos_id: the start id, or ``None``.
        eos_id: the end id.
        pad_id: the id that fills a final partial sequence (its targets carry no loss).
        vocab_size: number of ids.
        special_pieces: ``{text: id}`` of the special tokens the tokenizer knows (its start,
            end and pad tokens, a byte-pair vocabulary's unsplittable tokens, a SentencePiece
            model's control pieces); in chat text each becomes its one id.
        chat_template: the template chat rows are rendered with, or ``None``.
    """

    def __init__(self, tokenizer: Any, handle: str | None = None):
        self.tokenizer, self.handle = tokenizer, handle
        self.bos_id = getattr(tokenizer, "start_token_id", None)
        self.eos_id = getattr(tokenizer, "end_token_id", None)
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        self.vocab_size = int(tokenizer.vocabulary_size())
        self.special_pieces = _special_pieces(tokenizer, self.vocab_size)
        self.chat_template: ChatTemplate | None = None
        if self.eos_id is None:
            raise ConfigError(
                f"The tokenizer {type(tokenizer).__name__} has no end token: pass one with an "
                "end_token, or --tokenizer byte."
            )

    def encode(self, text: str) -> np.ndarray:
        """The ids of ``text``, without special ids, as a 1-D ``int32`` array."""
        if not text:
            return np.zeros(0, np.int32)
        return np.asarray(self.tokenizer.tokenize(text), dtype=np.int32).reshape(-1)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """The text of ``ids``, with the special ids (start, end, pad) dropped."""
        arr = np.asarray(list(ids) if not hasattr(ids, "__array__") else ids, np.int64)
        special = {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}
        kept = [int(i) for i in arr.reshape(-1) if int(i) not in special]
        return str(self.tokenizer.detokenize(np.asarray(kept, np.int32))) if kept else ""

    def __repr__(self) -> str:
        name = type(self.tokenizer).__name__
        return f"PresetTokenizer({name}, vocab_size={self.vocab_size}, handle={self.handle!r})"


def load_tokenizer(
    spec: str, chat_template: str | Path | None = None
) -> ByteTokenizer | PresetTokenizer:
    """The tokenizer ``spec`` names: ``"byte"``, or a preset (folder or handle).

    Its chat template is ``chat_template`` (a Jinja file or ``tokenizer_config.json``) if
    given, else the one a Hugging Face folder ships (``chat_template.jinja`` or
    ``tokenizer_config.json``); KerasHub presets and hub handles have none.

    Raises:
      ConfigError: ``spec`` is neither, the preset has no tokenizer, or KerasHub is missing.
    """
    if spec == "byte":
        chosen: ByteTokenizer | PresetTokenizer = ByteTokenizer()
    else:
        chosen = _preset_tokenizer(spec)
        is_folder = chat_template is None and Path(spec).expanduser().is_dir()
        found = folder_template(spec) if is_folder else None
        if found is not None:
            source, origin, tokens = found
            chosen.chat_template = ChatTemplate(
                source,
                origin,
                tokens["bos_token"] or _token_text(chosen, chosen.bos_id),
                tokens["eos_token"] or _token_text(chosen, chosen.eos_id),
            )
    return chosen if chat_template is None else with_chat_template(chosen, chat_template)


def _preset_tokenizer(spec: str) -> PresetTokenizer:
    from kithara_ops.models.hub import is_preset, preset_tokenizer

    if not is_preset(spec):
        raise ConfigError(
            f"--tokenizer {spec!r} is neither 'byte' nor a preset folder (a folder with a "
            "config.json, written by save_to_preset or from Hugging Face) nor a hub handle."
        )
    try:
        tokenizer = preset_tokenizer(spec)
    except (ValueError, FileNotFoundError, OSError) as err:
        raise ConfigError(
            f"No tokenizer could be loaded from {spec!r} ({first_line(err)}): pass "
            "--tokenizer byte or a preset folder that has one."
        ) from None
    return PresetTokenizer(tokenizer, handle=spec)


def with_chat_template(
    tokenizer: ByteTokenizer | PresetTokenizer, path: str | Path
) -> ByteTokenizer | PresetTokenizer:
    """A copy of ``tokenizer`` whose chat template is the one in file ``path``.

    ``bos_token`` and ``eos_token`` are the texts of the tokenizer's start and end ids.
    """
    chosen = copy.copy(tokenizer)
    chosen.chat_template = ChatTemplate(
        read_template_file(path),
        str(path),
        _token_text(tokenizer, tokenizer.bos_id),
        _token_text(tokenizer, tokenizer.eos_id),
    )
    return chosen


def _token_text(tokenizer: ByteTokenizer | PresetTokenizer, token_id: int | None) -> str:
    """The text of a special id (``""`` for the byte tokenizer's, which have none)."""
    if token_id is None or not isinstance(tokenizer, PresetTokenizer):
        return ""
    return str(tokenizer.tokenizer.id_to_token(int(token_id)))


def _special_pieces(tokenizer: Any, vocab_size: int) -> dict[str, int]:
    """``{text: id}`` of the tokens a KerasHub tokenizer treats as special (see the class)."""
    names = set(getattr(tokenizer, "special_tokens", None) or ())
    names |= set(getattr(tokenizer, "unsplittable_tokens", None) or ())
    proto = getattr(tokenizer, "proto", None)
    if isinstance(proto, bytes):
        import sentencepiece

        model = sentencepiece.SentencePieceProcessor(model_proto=proto)
        names |= {
            model.id_to_piece(i) for i in range(model.get_piece_size()) if model.is_control(i)
        }
    pieces = {}
    for name in names:
        try:
            token_id = int(tokenizer.token_to_id(name))
        except (KeyError, ValueError, TypeError):
            continue
        if 0 <= token_id < vocab_size and name:
            pieces[name] = token_id
    return pieces


def run_tokenizer(
    tokenizer: str, model: str, chat_template: str | Path | None = None
) -> ByteTokenizer | PresetTokenizer:
    """The tokenizer a run's config names: ``auto`` is the model's own when ``model`` is a
    preset (folder or handle), and bytes for the built-in and user models; with its chat
    template (``chat_template``, else a Hugging Face folder's own, see ``load_tokenizer``)."""
    if tokenizer == "auto":
        from kithara_ops.models.hub import is_preset
        from kithara_ops.models.registry import SIZES

        # A built-in size is never a preset: asking KerasHub would import TensorFlow.
        tokenizer = model if model not in SIZES and is_preset(model) else "byte"
    return load_tokenizer(tokenizer, chat_template)


def as_tokenizer(tokenizer: Any) -> ByteTokenizer | PresetTokenizer:
    """``tokenizer`` as packing uses it: ours as they are, a KerasHub tokenizer wrapped.

    Raises:
      ConfigError: ``tokenizer`` is neither.
    """
    if tokenizer is None:
        return ByteTokenizer()
    if isinstance(tokenizer, ByteTokenizer | PresetTokenizer):
        return tokenizer
    if hasattr(tokenizer, "tokenize") and hasattr(tokenizer, "vocabulary_size"):
        return PresetTokenizer(tokenizer)
    raise ConfigError(
        f"tokenizer must be a KerasHub tokenizer or a ByteTokenizer, got "
        f"{type(tokenizer).__name__}: load one with keras_hub.tokenizers.Tokenizer.from_preset."
    )
