"""Training data: an offline byte tokenizer, document sources, packing and batching.

``load(spec, seq_len=..., batch_size=...)`` goes from a source spec (``stdlib``,
``synthetic``, a file, directory, glob or ``.jsonl`` file) to a ``Dataset`` whose iterator
yields ``{"x", "y", "mask"}`` numpy batches in a seeded order and can save and restore its
position for resumable runs.
"""

from kithara_ops.data.pipeline import DataIterator, Dataset, Packed, load, pack
from kithara_ops.data.sources import Document, read_documents
from kithara_ops.data.tokenizer import ByteTokenizer

__all__ = [
    "ByteTokenizer",
    "DataIterator",
    "Dataset",
    "Document",
    "Packed",
    "load",
    "pack",
    "read_documents",
]
