"""Pre-flight checks: what a run needs from its surroundings, checked before anything compiles.

A run that cannot save its checkpoints, cannot reach a tracking store of a known kind, or
feeds token ids its model has no logits for would otherwise fail minutes later (after
compilation, or at the first save). ``build_trainer`` runs these checks first; each failure
is one ``ConfigError`` line naming the bad value and the fix.

The checks need nothing but paths, the config and the built model, and they write nothing
that outlives them: the writability probe is a file created and deleted at once, in the
checkpoint directory or, when it does not exist yet, in its nearest existing parent. A
``Trainer`` built directly from Python skips them; there, Orbax reports an unusable
checkpoint directory at the first save.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kithara_ops.errors import ConfigError, first_line

CHECKPOINTS_OF_ROOM = 2
"""How many checkpoints of a run's state must fit: the one being written and the last good one
(Orbax writes a new checkpoint completely before the old one may be deleted)."""

STATE_COPIES = 3
"""A first estimate of a state's size in copies of the model's variables: the weights plus two
optimizer slots per weight (Adam's first and second moments, the common case)."""

_FALLBACK_SCHEMES = (
    "file",
    "sqlite",
    "postgresql",
    "mysql",
    "mssql",
    "http",
    "https",
    "databricks",
    "databricks-uc",
    "uc",
)


def _mib(size: float) -> str:
    return f"{size / (1 << 20):,.0f} MiB" if size >= 1 << 20 else f"{size / 1024:,.1f} KiB"


def _existing_ancestor(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest parent that does."""
    path = path.absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor)


def check_checkpoint_path(directory: str | Path) -> Path:
    """Check that ``directory`` can be a checkpoint directory, writing nothing that stays.

    It must not be a file, nor lie under a file, and the directory (or, before it exists, its
    nearest existing parent, where it will be created) must accept a new file.

    Returns:
      The existing directory whose file system the checkpoints will be written to.

    Raises:
      ConfigError: the path is a file, lies under a file, or is not writable.
    """
    path = Path(directory)
    name = repr(str(directory))
    base = _existing_ancestor(path)
    if not base.is_dir():
        if base == path.absolute():
            raise ConfigError(
                f"Checkpoint directory {name} is a file: pass a directory path to "
                "--checkpoint-dir (a new one is created)."
            )
        raise ConfigError(
            f"Checkpoint directory {name} cannot be created: {str(base)!r} is a file, not a "
            "directory; choose another --checkpoint-dir."
        )
    try:
        # Root passes permission checks that os.access trusts, a read-only mount does not:
        # only writing a file shows whether writing files works.
        handle, probe = tempfile.mkstemp(prefix=".kithara-probe-", dir=base)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        where = "" if base == path.absolute() else f" (it would be created in {str(base)!r})"
        raise ConfigError(
            f"Checkpoint directory {name} is not writable{where}: {first_line(err)}; choose "
            "another --checkpoint-dir or fix its permissions."
        ) from None
    return base


def state_bytes(model: Any) -> int:
    """An estimate of the bytes one checkpoint of a run of ``model`` takes.

    The model's variables times ``STATE_COPIES`` (weights and two optimizer slots): a first
    estimate, exact for Adam-like optimizers, generous for SGD, and good enough to tell a
    full disk from one with room.
    """
    size = 0
    for variable in model.variables:
        shape = tuple(variable.shape)
        size += int(np.prod(shape, dtype=np.int64)) * np.dtype(variable.dtype).itemsize
    return size * STATE_COPIES


def check_checkpoint_room(directory: str | Path, model: Any) -> None:
    """Check that ``CHECKPOINTS_OF_ROOM`` checkpoints of a run of ``model`` fit on the disk.

    Raises:
      ConfigError: the file system of ``directory`` has less free space than that.
    """
    base = check_checkpoint_path(directory)
    need = CHECKPOINTS_OF_ROOM * state_bytes(model)
    free = shutil.disk_usage(base).free
    if free < need:
        raise ConfigError(
            f"Checkpoint directory {str(directory)!r} has {_mib(free)} free but two "
            f"checkpoints of this run need about {_mib(need)}: free space or choose another "
            "--checkpoint-dir."
        )


def tracking_schemes() -> list[str]:
    """The URI schemes MLflow's tracking store registry accepts here, plugins included."""
    try:
        from mlflow.tracking._tracking_service import utils

        # A private registry, read for its names only; a later MLflow may move it.
        registry = utils._tracking_store_registry._registry
        schemes = sorted(scheme for scheme in registry if scheme)
    except Exception:
        schemes = []
    return schemes or list(_FALLBACK_SCHEMES)


def check_tracking_uri(uri: str | None) -> None:
    """Check that a tracking URI names a kind of store MLflow knows.

    ``None`` is allowed (MLflow's own resolution: ``$MLFLOW_TRACKING_URI``, else its default),
    and so is ``$MLFLOW_TRACKING_URI`` itself, checked the same way when set.

    Raises:
      ConfigError: the URI has no scheme, or one MLflow has no store for.
    """
    source = "--tracking-uri"
    if uri is None:
        uri, source = os.environ.get("MLFLOW_TRACKING_URI") or None, "$MLFLOW_TRACKING_URI"
        if uri is None:
            return
    schemes = tracking_schemes()
    scheme, sep, _ = uri.partition(":")
    known = ", ".join(schemes)
    if not sep or not scheme or " " in uri.strip() or not _is_scheme(scheme):
        raise ConfigError(
            f"Tracking URI {uri!r} ({source}) is not a URI: write scheme:location with one of "
            f"the schemes MLflow accepts ({known}), e.g. sqlite:///mlflow.db or "
            "http://HOST:5000."
        )
    if scheme.lower() not in schemes:
        raise ConfigError(
            f"Tracking URI {uri!r} ({source}) has the scheme {scheme!r}, which MLflow has no "
            f"store for: use one of {known}."
        )


def check_surroundings(
    tracking: bool, tracking_uri: str | None, checkpoint_dir: str | None
) -> None:
    """The checks that need neither JAX nor the model: the tracking store's URI (when the run
    is tracked) and the checkpoint directory (when it has one).

    The command line runs them before it loads JAX and Keras, so that a mistyped URI or a
    checkpoint path that is a file is answered at once; ``build_trainer`` runs them too.

    Raises:
      ConfigError: as ``check_tracking_uri`` and ``check_checkpoint_path``.
    """
    if tracking:
        check_tracking_uri(tracking_uri)
    if checkpoint_dir:
        check_checkpoint_path(checkpoint_dir)


def _is_scheme(text: str) -> bool:
    """Whether ``text`` is an RFC 3986 scheme (a letter, then letters, digits, + - .)."""
    return (
        text[:1].isascii()
        and text[:1].isalpha()
        and all(c.isascii() and (c.isalnum() or c in "+-.") for c in text)
    )


def check_token_ids(batch: Mapping, vocab_size: int | None) -> None:
    """Check that a batch's token ids are valid rows of the model's logits.

    Ids at or past the vocabulary would index past the embedding table and the logits; JAX
    clamps such indices silently, so a wrong tokenizer trains on garbage instead of failing.

    Args:
      batch: a batch mapping with ``x`` and ``y``.
      vocab_size: the model's vocabulary (its output's last dimension); ``None`` skips.

    Raises:
      ConfigError: an id is negative or not below ``vocab_size``.
    """
    if vocab_size is None or not isinstance(batch, Mapping):
        return
    arrays = [np.asarray(batch[key]) for key in ("x", "y") if key in batch]
    arrays = [a for a in arrays if a.size and np.issubdtype(a.dtype, np.integer)]
    if not arrays:
        return
    top = max(int(a.max()) for a in arrays)
    low = min(int(a.min()) for a in arrays)
    if top >= vocab_size:
        raise ConfigError(
            f"batch ids reach {top} but the model's vocabulary is {vocab_size}: give the model "
            f"a vocabulary of at least {top + 1} (its factory receives vocab_size) or use data "
            "tokenized for it."
        )
    if low < 0:
        raise ConfigError(
            f"batch ids go down to {low}, but token ids start at 0: check the data's tokenizer."
        )
