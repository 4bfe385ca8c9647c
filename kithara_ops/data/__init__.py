"""Training data: tokenizers (bytes, or a model preset's own), sources, packing, batching.

``load(spec, seq_len=..., batch_size=...)`` goes from a source spec (``stdlib``,
``synthetic``, a file, directory, glob or ``.jsonl`` file of text, prompt/completion
pairs or chat conversations) to a ``Dataset`` whose iterator
yields ``{"x", "y", "mask"}`` numpy batches in a seeded order and can save and restore its
position for resumable runs.
"""

from kithara_ops.data.chat import ChatTemplate
from kithara_ops.data.pipeline import DataIterator, Dataset, Packed, load, pack
from kithara_ops.data.preset_tokenizer import (
    PresetTokenizer,
    as_tokenizer,
    load_tokenizer,
    run_tokenizer,
)
from kithara_ops.data.sources import Document, read_documents
from kithara_ops.data.tokenizer import ByteTokenizer

__all__ = [
    "ByteTokenizer",
    "ChatTemplate",
    "DataIterator",
    "Dataset",
    "Document",
    "Packed",
    "PresetTokenizer",
    "as_tokenizer",
    "load",
    "load_tokenizer",
    "pack",
    "read_documents",
    "run_tokenizer",
]
