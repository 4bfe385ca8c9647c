"""``ByteTokenizer``: UTF-8 bytes as token ids, plus three special ids.

A byte vocabulary needs no download and no training, encodes any text losslessly and is
small enough (259 ids) for the built-in models, which makes runs reproducible anywhere.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class ByteTokenizer:
    """Byte-level tokenizer: ids 0..255 are the UTF-8 bytes, then pad, bos and eos.

    Attributes:
        pad_id: Id that fills the unused tail of the last packed sequence.
        bos_id: Id placed before every document.
        eos_id: Id placed after every document.
        vocab_size: Number of ids (256 bytes + 3 special ids).
        chat_template: The template chat rows are rendered with (``None``: chat rows are
            refused); see ``kithara_ops.data.chat``.
    """

    pad_id: int = 256
    bos_id: int = 257
    eos_id: int = 258
    vocab_size: int = 259
    chat_template = None

    def encode(self, text: str) -> np.ndarray:
        """Turns text into its UTF-8 byte ids, without special ids.

        Args:
            text: Any Unicode string.

        Returns:
            A 1-D ``int32`` array with one id per UTF-8 byte of ``text``.
        """
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Turns ids back into text, dropping the special ids.

        Args:
            ids: Token ids, for example a row of a batch or a model's samples.

        Returns:
            The decoded text; byte sequences that are not valid UTF-8 (a sequence cut
            mid-character, or sampled ids) become U+FFFD instead of raising.
        """
        # Arrays (numpy or JAX) convert without a Python loop; only generators need list().
        if not hasattr(ids, "__array__") and not isinstance(ids, list | tuple):
            ids = list(ids)
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        data = arr[(arr >= 0) & (arr < 256)].astype(np.uint8)
        return data.tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"
