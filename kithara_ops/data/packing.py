"""How documents share rows: packed with document masking, or one document per row.

``pack`` concatenates every document (``[bos] ... [eos]``) into one token stream. With
``concat`` the rows are windows of that stream and a document attends to the ones before it
in its row. The other two modes keep documents apart, and say where each one is:

- ``documents``: rows are still windows of the stream (no space is lost), with
  ``segment_ids`` (1, 2, ... for the documents of a row, 0 for padding) and ``positions``
  (each token's position in its own document). A model that takes them (the built-in
  transformer) attends only within a segment, so each document gets the logits it would get
  alone; a target that lies in the next document is not trained.
- ``none``: each document starts its own rows (a long one takes several, each continuing
  where the last stopped), padded at the end: correct for any causal model, whatever inputs
  it takes, at the cost of the padding.
"""

from __future__ import annotations

import numpy as np

MODES = ("concat", "documents", "none")
"""The values of ``RunConfig.packing``."""


def document_rows(
    stream: np.ndarray, weight: np.ndarray, doc_of: np.ndarray, seq_len: int, pad_id: int
) -> tuple[np.ndarray, ...]:
    """``packing="none"``: every document in rows of its own, padded with ``pad_id``: the
    rows' ``x``, ``y``, ``mask`` (bool), ``segment_ids`` and ``positions``.

    Args:
      stream: the token stream; weight: whether each token is a trained target;
      doc_of: each token's document number (non-decreasing).
    """
    starts = np.flatnonzero(np.diff(doc_of, prepend=-1))
    ends = np.append(starts[1:], len(stream))
    x, y, mask, real, positions = [], [], [], [], []
    for start, end in zip(starts, ends, strict=True):
        # Windows of seq_len + 1 tokens sharing one, as in the stream's own windows.
        for offset in range(0, max(end - start - 1, 1), seq_len):
            lo, hi = start + offset, min(start + offset + seq_len + 1, end)
            n = hi - lo - 1
            if n < 1 or not weight[lo + 1 : hi].any():
                continue
            pad = seq_len - n
            x.append(np.pad(stream[lo : hi - 1], (0, pad), constant_values=pad_id))
            y.append(np.pad(stream[lo + 1 : hi], (0, pad), constant_values=pad_id))
            mask.append(np.pad(weight[lo + 1 : hi], (0, pad)))
            real.append(np.arange(seq_len) < n)
            positions.append(np.where(np.arange(seq_len) < n, offset + np.arange(seq_len), 0))
    if not x:
        empty = np.zeros((0, seq_len), np.int32)
        return empty, empty, empty.astype(bool), empty, empty
    ints = lambda rows: np.stack(rows).astype(np.int32)  # noqa: E731
    return ints(x), ints(y), np.stack(mask).astype(bool), ints(real), ints(positions)


def segment_rows(doc_of: np.ndarray, rows: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``packing="documents"``: ``segment_ids`` and ``positions`` of the stream's windows.

    Row ``r`` holds stream tokens ``r * seq_len ..`` (a last row may run past the stream:
    padding, segment 0). A row's first document is segment 1, the next 2, and so on;
    positions count from each document's first token, also for a document that began in an
    earlier row.
    """
    index = np.arange(rows * seq_len).reshape(rows, seq_len)
    inside = index < len(doc_of)
    docs = np.where(inside, doc_of[np.minimum(index, len(doc_of) - 1)], -1)
    segments = np.where(inside, docs - docs[:, :1] + 1, 0)
    first = np.flatnonzero(np.diff(doc_of, prepend=-1))  # each document's first token
    start = first[np.searchsorted(first, np.minimum(index, len(doc_of) - 1), side="right") - 1]
    positions = np.where(inside, index - start, 0)
    return segments.astype(np.int32), positions.astype(np.int32)
