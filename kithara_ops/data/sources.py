"""Reading documents from a data source spec (``stdlib``, ``synthetic``, files, JSONL).

Every source resolves to a deterministic, ordered list of ``Document``: the same spec on
the same machine always gives the same documents in the same order, so a run's data order
depends only on its seed.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import random
import sys
import sysconfig
from pathlib import Path

from kithara_ops.data.chat import check_messages
from kithara_ops.errors import ConfigError

STDLIB_BYTE_BUDGET = 4 * 1024 * 1024
"""Bytes of standard-library source the ``stdlib`` source reads (first files by path)."""

_STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
_SNIFF_BYTES = 8192


@dataclasses.dataclass(frozen=True)
class Document:
    """One training document.

    Attributes:
        text: The document's text; for prompt/completion data, the completion.
        prompt: The prompt the model is conditioned on but not trained to predict;
            ``""`` for plain text.
        messages: A chat conversation (``{"role", "content"}`` dicts), rendered with the
            model's chat template when packed; ``()`` for other documents.
        where: Where the document came from (file and line), for messages about it.
    """

    text: str
    prompt: str = ""
    messages: tuple[dict[str, str], ...] = ()
    where: str = dataclasses.field(default="", compare=False)


def read_documents(spec: str) -> list[Document]:
    """Reads the documents a data source spec names.

    Args:
        spec: ``"stdlib"`` (this interpreter's standard-library ``.py`` files, capped at
            ``STDLIB_BYTE_BUDGET`` bytes), ``"synthetic"`` (a small generated arithmetic
            corpus), a text file, a directory (every file under it), a glob pattern
            containing ``*``, or a ``.jsonl`` file whose lines hold ``text``,
            ``prompt``/``completion`` or ``messages`` (a chat conversation) fields.

    Returns:
        The documents in a deterministic order.

    Raises:
        ConfigError: The path does not exist, the glob matches no file, a file named
            (directly or by the glob) is binary, a JSONL line is invalid, or the corpus
            holds no text.
    """
    if spec == "stdlib":
        docs = _stdlib_documents()
    elif spec == "synthetic":
        docs = _synthetic_documents()
    elif "*" in spec:
        paths = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not paths:
            raise ConfigError(
                f"Data glob {spec!r} matches no file: check the pattern (quote it so the "
                "shell does not expand it)."
            )
        docs = [doc for path in paths for doc in _file_documents(path)]
    else:
        path = Path(spec)
        if path.is_dir():
            docs = [doc for p in _walk_files(path) for doc in _file_documents(p, sniff=True)]
        elif path.is_file():
            docs = _file_documents(path)
        else:
            raise ConfigError(
                f"Data file {spec!r} does not exist: check the path, or use 'stdlib' or "
                "'synthetic'."
            )
    if not any(doc.text or doc.prompt or doc.messages for doc in docs):
        raise ConfigError(
            f"Data source {spec!r} has no text: point it at non-empty text or JSONL files."
        )
    return docs


def _file_documents(path: Path, *, sniff: bool = False) -> list[Document]:
    """One document per text file, or one per line of a ``.jsonl`` file."""
    if path.suffix == ".jsonl":
        return _jsonl_documents(path)
    raw = path.read_bytes()
    # A NUL byte in the first block is the usual cheap test for "not text". Inside a
    # directory, binary files (images, archives) are skipped; one named on its own is a
    # mistake worth a message, not a corpus of noise bytes.
    if b"\0" in raw[:_SNIFF_BYTES]:
        if sniff:
            return []
        raise ConfigError(
            f"Data file {str(path)!r} is binary, not text (it holds NUL bytes): pass a UTF-8 "
            "text file, a .jsonl file or a directory of them."
        )
    return [Document(raw.decode("utf-8", errors="replace"))]


def _jsonl_documents(path: Path) -> list[Document]:
    docs = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as err:
                raise ConfigError(
                    f"Data file {str(path)!r} line {lineno} is not valid JSON "
                    f"({_json_fault(err)}): write one JSON object per line."
                ) from None
            docs.append(_record_document(record, path, lineno))
    return docs


def _json_fault(err: Exception) -> str:
    """Why a line did not parse, shortly.

    Besides syntax, Python's parser refuses integers of more than
    ``sys.get_int_max_str_digits()`` digits (``ValueError``) and arrays or objects nested
    deeper than the recursion limit (``RecursionError``): both are rows no corpus needs.
    """
    if isinstance(err, json.JSONDecodeError):
        return err.msg
    if isinstance(err, RecursionError):
        return "arrays or objects nested too deeply"
    return f"an integer of more than {sys.get_int_max_str_digits()} digits"


def _record_document(record: object, path: Path, lineno: int) -> Document:
    if isinstance(record, dict):
        text = record.get("text")
        if isinstance(text, str):
            return Document(text)
        prompt, completion = record.get("prompt"), record.get("completion")
        if isinstance(prompt, str) and isinstance(completion, str):
            return Document(completion, prompt=prompt)
        if "messages" in record:
            where = f"Data file {str(path)!r} line {lineno}"
            return Document("", messages=check_messages(record, where), where=where)
    raise ConfigError(
        f"Data file {str(path)!r} line {lineno} has no string 'text' field, 'prompt' and "
        "'completion' fields nor a 'messages' list: give every line one of them."
    )


def _walk_files(root: Path) -> list[Path]:
    """Every non-hidden file under ``root``, sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place keeps os.walk out of .git and similar metadata directories.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath, f) for f in filenames if not f.startswith("."))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _stdlib_documents() -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning here (not filtering afterwards) avoids walking a large site-packages.
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP and d != "__pycache__"]
        paths.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    paths.sort(key=lambda p: p.relative_to(root).as_posix())
    docs, used = [], 0
    for path in paths:
        text = path.read_bytes().decode("utf-8", errors="replace")
        size = len(text.encode("utf-8"))
        if used + size > STDLIB_BYTE_BUDGET:
            break
        docs.append(Document(text))
        used += size
    return docs


def _synthetic_documents() -> list[Document]:
    """A few thousand arithmetic and counting lines, grouped four to a document.

    The lines follow simple rules a small model learns in a few hundred steps, which makes
    the corpus useful for checking that training actually lowers the loss.
    """
    lines = [f"{a} + {b} = {a + b}\n" for a in range(50) for b in range(50)]
    lines += [
        f"count from {start}: {' '.join(str(start + i) for i in range(5))}\n"
        for start in range(500)
    ]
    # A private, fixed-seed generator: the order is the same in every process and run,
    # whatever else has touched the global random state.
    random.Random(1234).shuffle(lines)
    return [Document("".join(lines[i : i + 4])) for i in range(0, len(lines), 4)]
