"""Packing documents into fixed-length sequences and a resumable, seeded batch iterator.

The batch order is a pure function of ``(seed, batch number)``: grain computes each
epoch's permutation on demand instead of materialising it, so an iterator's whole state is
the number of the next batch and restoring it reproduces the uninterrupted stream exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import grain
import numpy as np

from kithara_ops.data.chat import chat_tokens
from kithara_ops.data.packing import MODES, document_rows, segment_rows
from kithara_ops.data.preset_tokenizer import PresetTokenizer, as_tokenizer, with_chat_template
from kithara_ops.data.sources import Document, read_documents
from kithara_ops.data.tokenizer import ByteTokenizer
from kithara_ops.errors import ConfigError


class Packed(NamedTuple):
    """Packed training sequences, one row per sequence.

    Attributes:
        x: ``int32 (n, seq_len)`` input ids.
        y: ``int32 (n, seq_len)`` target ids: ``x`` shifted left by one token.
        mask: ``float32 (n, seq_len)`` loss weight of each target: 0 for prompt tokens
            and padding, 1 otherwise.
        segment_ids, positions: ``int32 (n, seq_len)``, where documents are kept apart
            (``packing``, see ``data.packing``); ``None`` otherwise.
    """

    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray
    segment_ids: np.ndarray | None = None
    positions: np.ndarray | None = None


def pack(
    documents: Sequence[Document],
    tokenizer: ByteTokenizer | PresetTokenizer,
    seq_len: int,
    packing: str = "concat",
) -> Packed:
    """Concatenates tokenized documents into one stream and cuts it into sequences.

    Each document becomes ``[bos] + prompt + text + [eos]``; a chat conversation becomes
    ``[bos] + rendered conversation + [eos]`` with only its replies trained (see
    ``kithara_ops.data.chat``). Consecutive windows share one
    token (window ``i`` covers stream positions ``i*seq_len .. (i+1)*seq_len``), so every
    stream token after the first is a target exactly once. A final partial window is
    padded with ``pad_id`` if it holds at least one trained target, otherwise dropped.

    Args:
        documents: The documents, in order.
        tokenizer: Provides ``encode`` and the ``pad_id``/``bos_id``/``eos_id`` ids.
        seq_len: Tokens per sequence.
        packing: ``concat`` (as above), ``documents`` (the same rows, with segment ids and
            positions) or ``none`` (one document per row): see ``data.packing``.

    Returns:
        The packed ``x``, ``y`` and ``mask`` arrays (and segment ids and positions).

    Raises:
        ConfigError: ``seq_len`` is below 1 or the documents give no sequence.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len must be a positive integer, got {seq_len!r}.")
    if packing not in MODES:
        raise ConfigError(f"packing must be one of {', '.join(MODES)}, got {packing!r}.")
    # Some families (Qwen) have no start token: their documents begin with their text.
    bos = np.array([] if tokenizer.bos_id is None else [tokenizer.bos_id], np.int32)
    eos = np.array([tokenizer.eos_id], np.int32)
    pieces, trained, sizes = [], [], []
    for doc in documents:
        sizes.append(len(pieces))
        if doc.messages:
            # Replies are trained, the rest of the conversation is prompt; the end id is
            # trained when the conversation ends with a reply.
            ids, weights = chat_tokens(tokenizer, doc.messages, doc.where or "A chat row")
            pieces += [bos, ids, eos]
            trained += [
                np.ones(len(bos), bool),
                weights,
                weights[-1:] if len(weights) else np.zeros(1, bool),
            ]
            continue
        prompt_ids = tokenizer.encode(doc.prompt) if doc.prompt else bos[:0]
        text_ids = tokenizer.encode(doc.text)
        pieces += [bos, prompt_ids, text_ids, eos]
        # Prompt tokens condition the completion but are never targets of the loss.
        trained += [
            np.ones(len(bos), bool),
            np.zeros(len(prompt_ids), bool),
            np.ones(len(text_ids) + 1, bool),
        ]
    stream = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    weight = np.concatenate(trained) if trained else np.zeros(0, bool)
    lengths = [len(piece) for piece in pieces]
    per_doc = np.add.reduceat(lengths, sizes) if sizes else np.zeros(0, int)
    doc_of = np.repeat(np.arange(len(per_doc)), per_doc)
    if packing == "none":
        x, y, mask, segments, positions = document_rows(
            stream, weight, doc_of, seq_len, tokenizer.pad_id
        )
        if len(x) == 0:
            raise ConfigError(
                f"The data gives no training sequence at seq_len {seq_len}: add documents "
                "with text."
            )
        return Packed(x, y, mask.astype(np.float32), segments, positions)

    n_full = max(len(stream) - 1, 0) // seq_len
    end = n_full * seq_len
    x = stream[:end].reshape(n_full, seq_len)
    y = stream[1 : end + 1].reshape(n_full, seq_len)
    mask = weight[1 : end + 1].reshape(n_full, seq_len)
    tail_weight = weight[end + 1 :]
    if tail_weight.any():
        tail = np.full(seq_len + 1, tokenizer.pad_id, np.int32)
        tail[: len(stream) - end] = stream[end:]
        tail_mask = np.zeros(seq_len, bool)
        tail_mask[: len(tail_weight)] = tail_weight
        x = np.concatenate([x, tail[None, :-1]])
        y = np.concatenate([y, tail[None, 1:]])
        mask = np.concatenate([mask, tail_mask[None]])
    if len(x) == 0:
        raise ConfigError(
            f"The data gives no training sequence at seq_len {seq_len}: add documents with text."
        )
    segments = positions = None
    if packing == "documents":
        segments, positions = segment_rows(doc_of, len(x), seq_len)
        # The target after a document's last token is the next document's first: not its own.
        after = np.append(doc_of[1:], -1)
        crosses = np.zeros(len(x) * seq_len, bool)
        crosses[: min(len(doc_of), crosses.size)] = (after != doc_of)[: crosses.size]
        mask = mask & ~crosses.reshape(mask.shape)
    return Packed(
        np.ascontiguousarray(x, np.int32),
        np.ascontiguousarray(y, np.int32),
        mask.astype(np.float32),
        segments,
        positions,
    )


class Dataset:
    """Batches of packed sequences in a seeded order, reshuffled every epoch.

    ``len(dataset)`` is the number of batches per epoch; sequences beyond the last full
    batch of an epoch are left out of that epoch (a different subset each epoch when
    shuffling).

    Args:
        packed: The packed sequences.
        batch_size: Sequences per batch.
        seed: Seeds the order; any non-negative integer.
        shuffle: Visit the sequences in a seeded random order, new every epoch.
        repeat: Loop over the data forever (training); otherwise stop after one epoch.

    Raises:
        ConfigError: ``batch_size`` is below 1 or larger than the number of sequences,
            or ``seed`` is negative.
    """

    def __init__(
        self,
        packed: Packed,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        repeat: bool = True,
        source: str | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}.")
        n = len(packed.x)
        if batch_size > n:
            raise ConfigError(
                f"batch_size {batch_size} is larger than the {n} sequences of the data; "
                "lower --batch-size or --seq-len."
            )
        self.packed = packed
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.repeat = repeat
        self.source = source
        self._batches = self._build()

    def summary(self) -> dict[str, Any]:
        """What MLflow records of the data: name, source, digest and a profile of its size.

        The digest is of the packed ids, loss weights and their shape (SHA-256, 16 hex
        digits), so two runs on the same tokens at the same length have the same digest.
        """
        digest = hashlib.sha256(repr(self.packed.x.shape).encode())  # rows cut differently
        for array in (self.packed.x, self.packed.y, self.packed.mask):
            digest.update(np.ascontiguousarray(array).tobytes())
        source = self.source or "documents"
        return {
            "name": Path(source).name or source,
            "source": source,
            "digest": digest.hexdigest()[:16],
            "profile": {
                "sequences": len(self.packed.x),
                "seq_len": int(self.packed.x.shape[1]),
                "tokens": int(self.packed.x.size),
                "trained_tokens": int(self.packed.mask.sum()),
            },
        }

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.packed.x) // self.batch_size

    def __iter__(self) -> DataIterator:
        """A new iterator positioned at the first batch."""
        return DataIterator(self)

    def __repr__(self) -> str:
        return (
            f"Dataset(sequences={len(self.packed.x)}, seq_len={self.packed.x.shape[1]}, "
            f"batch_size={self.batch_size}, batches_per_epoch={len(self)}, "
            f"seed={self.seed}, shuffle={self.shuffle}, repeat={self.repeat})"
        )

    def _build(self) -> grain.MapDataset:
        """The grain pipeline: batch number -> batch of numpy arrays."""
        n = len(self.packed.x)
        epoch_len = len(self) * self.batch_size
        order = grain.MapDataset.range(epoch_len).repeat(None if self.repeat else 1)
        if self.shuffle:
            # grain reseeds each epoch with seed + epoch; mixing the user seed first keeps
            # seed s and seed s + 1 from seeing the same orders one epoch apart.
            mixed = int(np.random.SeedSequence(self.seed).generate_state(1)[0])
            perm = grain.MapDataset.range(n).shuffle(seed=mixed)

            # Item i of epoch e is element i of epoch e's full permutation of all n
            # sequences; each epoch is cut to whole batches so no batch spans two epochs.
            def pick(position: int, i: int) -> int:
                return perm[(position // epoch_len) * n + i]

            order = order.map_with_index(pick)
        arrays = {key: value for key, value in self.packed._asdict().items() if value is not None}
        return order.batch(self.batch_size, drop_remainder=True).map(
            lambda idx: {key: value[idx] for key, value in arrays.items()}
        )


class DataIterator:
    """Iterates a ``Dataset``'s batches; its position can be saved and restored.

    Each batch is ``{"x": int32 (B, L), "y": int32 (B, L), "mask": float32 (B, L)}``, with
    ``segment_ids`` and ``positions`` (int32) where the data keeps documents apart.
    """

    def __init__(self, dataset: Dataset) -> None:
        self._dataset = dataset
        # Batches are cheap in-memory slices, so reading threads would only add GIL
        # contention and a prefetch buffer that runs ahead of the saved position.
        options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        self._it = iter(dataset._batches.to_iter_dataset(options))

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    @property
    def epoch(self) -> int:
        """Completed passes over the data (batches consumed // batches per epoch)."""
        return self.get_state()["next_batch"] // len(self._dataset)

    def get_state(self) -> dict[str, Any]:
        """The iterator's position as a small JSON-serialisable dict.

        Returns:
            ``{"next_batch": k, "batches_per_epoch": b, "seed": s}``; only ``next_batch``
            positions the iterator, the other two detect restoring into different data.
        """
        return {
            "next_batch": int(self._it.get_state()["next_index"]),
            "batches_per_epoch": len(self._dataset),
            "seed": self._dataset.seed,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Moves the iterator to a position saved by ``get_state``.

        Args:
            state: A dict from ``get_state`` (possibly after a JSON round trip).

        Raises:
            ConfigError: The state is malformed or was saved for data with a different
                number of batches per epoch or a different seed.
        """
        k = state.get("next_batch") if isinstance(state, dict) else None
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ConfigError(
                f"Data iterator state {state!r} has no valid 'next_batch': pass a dict "
                "saved by get_state()."
            )
        for key, current in (
            ("batches_per_epoch", len(self._dataset)),
            ("seed", self._dataset.seed),
        ):
            if key in state and state[key] != current:
                raise ConfigError(
                    f"Data iterator state was saved with {key}={state[key]!r} but this data "
                    f"has {key}={current!r}: resume with the same data, seq_len, "
                    "batch_size and seed."
                )
        self._it.set_state({"next_index": k})


def load(
    source: str | Sequence[Document],
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    repeat: bool = True,
    tokenizer: Any = None,
    chat_template: str | Path | None = None,
    packing: str = "concat",
) -> Dataset:
    """Reads, tokenizes and packs a data source into a batched ``Dataset``.

    Args:
        source: A source spec for ``read_documents`` or a list of ``Document``.
        seq_len: Tokens per sequence.
        batch_size: Sequences per batch.
        seed: Seeds the batch order.
        shuffle: Shuffle the sequences (reshuffled every epoch).
        repeat: Repeat forever (training) instead of stopping after one epoch. Evaluation
            data must end: pass ``repeat=False, shuffle=False`` for a Trainer's
            ``eval_data`` (one pass per evaluation).
        tokenizer: a ``ByteTokenizer`` (the default), a ``PresetTokenizer`` or a KerasHub
            tokenizer (``keras_hub.tokenizers.Tokenizer.from_preset(...)``).
        chat_template: a Jinja chat template file (or ``tokenizer_config.json``) for the
            ``messages`` rows of chat data, instead of the tokenizer's own.
        packing: how documents share rows (``data.packing.MODES``): ``concat``, ``documents``
            (with ``segment_ids`` and ``positions`` in each batch) or ``none``.

    Returns:
        The dataset; iterate it for batches.

    Raises:
        ConfigError: A bad source, ``seq_len``, ``batch_size`` or ``seed``.
    """
    documents = read_documents(source) if isinstance(source, str) else list(source)
    tokenizer = as_tokenizer(tokenizer)
    if chat_template is not None:
        tokenizer = with_chat_template(tokenizer, chat_template)
    packed = pack(documents, tokenizer, seq_len, packing)
    return Dataset(
        packed,
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        repeat=repeat,
        source=source if isinstance(source, str) else None,
    )
