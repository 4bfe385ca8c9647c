"""``RunRecord``: what a checkpoint stores beside the train state, typed and versioned.

The state (weights, optimizer state, step, RNG key) is arrays; everything else a resume
needs is here: the run's identity and config, the optimizer's description, the variable
keys in model order (Keras may rename layers between sessions; the order does not change),
the training iterator's position, the last losses. It is written and read in this module
only: ``to_json`` for a save, ``from_json`` for a read, which first migrates a record
written by an older release.

Versions:
  0: release 0.1.0, an untyped dict (``data.consumed``, ``mlflow.run_id``, objects in the
     config marked as ``"<label>"``).
  1: this dataclass, without ``checksums``.
  2: with ``checksums``; a version-1 record reads with ``checksums=None`` and its
     checkpoint restores unverified.
  3: ``given`` is the record's own field; versions 1 and 2 kept it in the config. Later
     version-3 records add ``bests`` and ``stop_reason``, optional fields an older reader
     passes over and a newer one reads as ``None`` when absent.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import importlib.metadata
import json
import os
import uuid
from typing import Any

import numpy as np

from kithara_ops.config import OBJECT_FIELDS, RunConfig
from kithara_ops.errors import ConfigError

RECORD_VERSION = 3
"""The version ``to_json`` writes; ``from_json`` reads it and every older one."""


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """Where a run stood when a checkpoint was saved.

    Attributes:
      step: the checkpoint's step (optimizer steps taken; also batches consumed).
      run_uid: the run's identity, kept across resumes (the MLflow run carries it as a tag).
      config: the run's ``RunConfig`` as plain values, without the launch fields.
      optimizer: ``describe_optimizer`` of the optimizer that wrote the optimizer state.
      keys: the state's variable keys by group, in the model's order.
      data_position: the training iterator's own ``get_state()`` after ``step`` batches, or
        ``None`` when it has none (the stream then re-reads and skips ``step`` batches).
      loss: training loss at the last logged step.
      eval_loss: the last evaluation loss.
      mlflow_run_id: the MLflow run recorded by release 0.1.0; newer records find the run by
        ``run_uid`` and leave this ``None``.
      saved_at: UTC time of the save, ISO 8601.
      versions: versions of the libraries the checkpoint depends on.
      checksums: ``{leaf path: checksum}`` of the saved state's arrays (``checkpoint.
        checksums``), compared when the state is read back; ``None`` for a record written
        before version 2, whose state is not verified.
      base_model: for a model loaded from a preset, its handle, fingerprint and LoRA
        settings (``models.hub.base_model_of``); a resume against other weights is refused.
      data_digest: the training data's ``summary()["digest"]`` (of its packed tokens), when
        the data has one; data named again on resume must give the same tokens.
      given: the config fields (of ``config.OBJECT_FIELDS``) that hold the label of a Python
        object the run was given, not a spec a resume or an export could rebuild from.
      bests: ``stopping.Bests.to_json()`` at the save: the best losses and the evaluations
        since the last improvement, so that early stopping counts on after a resume.
      stop_reason: ``early_stop`` or ``target_eval_loss`` when the run stopped early at
        this checkpoint's step; else ``None``.
    """

    step: int
    run_uid: str
    config: dict[str, Any]
    optimizer: dict[str, Any]
    keys: dict[str, list[str]]
    data_position: Any = None
    loss: float | None = None
    eval_loss: float | None = None
    mlflow_run_id: str | None = None
    saved_at: str = ""
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    checksums: dict[str, int] | None = None
    base_model: dict[str, Any] | None = None
    data_digest: str | None = None
    given: list[str] = dataclasses.field(default_factory=list)
    bests: dict[str, Any] | None = None
    stop_reason: str | None = None

    def run_config(self) -> RunConfig:
        """The saved config as a ``RunConfig``."""
        return RunConfig.from_dict(self.config)

    def to_json(self) -> dict[str, Any]:
        """The record as JSON values, stamped with ``RECORD_VERSION``."""
        return {"version": RECORD_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> RunRecord:
        """Read a record of any known version (migrating older ones).

        Raises:
          ConfigError: the record was written by a newer release, or is not a record.
        """
        if not isinstance(values, dict):
            raise ConfigError(f"A run record must be a JSON object, got {type(values).__name__}.")
        version = values.get("version", 0)
        if version > RECORD_VERSION:
            raise ConfigError(
                f"This checkpoint's record has version {version}, newer than this kithara-ops "
                f"reads ({RECORD_VERSION}): upgrade kithara-ops to resume it."
            )
        if version == 0:
            values = migrate_v0(values)
        if version <= 1:
            values = migrate_v1(values)
        if version <= 2:
            values = migrate_v2(values)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def new_record(
    step: int,
    *,
    run_uid: str,
    config: RunConfig,
    optimizer: dict[str, Any],
    keys: dict[str, list[str]],
    data_position: Any = None,
    loss: float | None = None,
    eval_loss: float | None = None,
    base_model: dict[str, Any] | None = None,
    data_digest: str | None = None,
    given: frozenset[str] | set[str] = frozenset(),
    bests: dict[str, Any] | None = None,
    stop_reason: str | None = None,
) -> RunRecord:
    """A record for a save now: the config without its launch fields, time and versions.

    Local paths in the config are stored absolute (``absolute_paths``), so that the run
    resumes and exports from any working directory.
    """
    return RunRecord(
        step=step,
        run_uid=run_uid,
        config=absolute_paths(config.without_launch().to_dict(), given),
        optimizer=optimizer,
        keys=keys,
        data_position=data_position,
        loss=loss,
        eval_loss=eval_loss,
        saved_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        versions=versions(),
        base_model=base_model,
        data_digest=data_digest,
        given=sorted(given),
        bests=bests,
        stop_reason=stop_reason,
    )


_NOT_PATHS = {"data": ("stdlib", "synthetic"), "eval_data": ("stdlib", "synthetic")}
"""Specs of the data fields that name no file."""


def absolute_paths(
    config: dict[str, Any], given: frozenset[str] | set[str] = frozenset()
) -> dict[str, Any]:
    """``config`` (``RunConfig.to_dict()``) with its local paths made absolute.

    ``checkpoint_dir`` and ``chat_template`` are always paths; ``data`` and ``eval_data``
    are unless they name a built-in corpus or (in ``given``) a Python object's label (a glob
    is anchored at the working directory);
    ``model`` and ``tokenizer`` are when they name an existing folder (else a size, a hub
    handle or a ``module:function``). A record written before paths were stored absolute
    keeps them relative to the working directory of the resume.
    """
    out = dict(config)
    for name in ("checkpoint_dir", "chat_template", "data", "eval_data", "model", "tokenizer"):
        value = out.get(name)
        if not isinstance(value, str) or not value or value in _NOT_PATHS.get(name, ()):
            continue
        if name == "data" and name in given:
            continue  # the label of a Python object, not a path
        if name in ("model", "tokenizer") and not os.path.isdir(value):
            continue
        out[name] = os.path.abspath(value)
    return out


def migrate_v0(meta: dict[str, Any]) -> dict[str, Any]:
    """A version-0 metadata dict (release 0.1.0) as version-1 fields.

    - ``"<label>"`` in ``model``/``data``/``optimizer`` becomes the label, named in the
      config's ``given`` (where version 1 kept it; ``migrate_v2`` moves it to the record);
    - the MLflow run id, tracking URI and experiment it recorded are kept, so a resume
      continues that MLflow run (the URI and experiment fill the config where it had none);
    - the data position keeps only the iterator's own state: batches consumed equal the step.
    """
    config = dict(meta.get("config") or {})
    given = set(config.get("given") or ())
    for name in OBJECT_FIELDS:
        value = config.get(name)
        if isinstance(value, str) and value.startswith("<") and value.endswith(">"):
            config[name] = value[1:-1]
            given.add(name)
    config["given"] = sorted(given)
    mlflow = meta.get("mlflow") or {}
    if config.get("tracking_uri") is None:
        config["tracking_uri"] = mlflow.get("tracking_uri")
    if config.get("experiment") is None:
        config["experiment"] = mlflow.get("experiment")
    run_id = mlflow.get("run_id")
    # No identity was recorded: one derived from the record keeps a resume's identity stable.
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()
    return {
        "step": meta["step"],
        "run_uid": run_id or digest[:32],
        "config": config,
        "optimizer": meta.get("optimizer") or {},
        "keys": meta.get("keys") or {},
        "data_position": (meta.get("data") or {}).get("iterator"),
        "loss": meta.get("loss"),
        "eval_loss": meta.get("eval_loss"),
        "mlflow_run_id": run_id,
        "saved_at": meta.get("saved_at", ""),
        "versions": meta.get("versions") or {},
    }


def migrate_v1(values: dict[str, Any]) -> dict[str, Any]:
    """A version-1 record as version-2 fields: no checksums were taken, so none are claimed."""
    return {**values, "checksums": None}


def migrate_v2(values: dict[str, Any]) -> dict[str, Any]:
    """A version-1 or -2 record as version-3 fields: ``given`` leaves the config for the record."""
    config = dict(values.get("config") or {})
    given = sorted(config.pop("given", None) or ())
    return {**values, "config": config, "given": given}


def new_run_uid() -> str:
    """A fresh run identity, the same in every process of a multi-process run."""
    import jax

    uid = np.frombuffer(uuid.uuid4().bytes, dtype=np.uint8)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        uid = np.asarray(multihost_utils.broadcast_one_to_all(uid))
    return bytes(uid.astype(np.uint8)).hex()


@functools.cache
def versions() -> dict[str, str]:
    """Versions of the libraries a checkpoint depends on (read once per process)."""
    out = {}
    for name in ("kithara-ops", "jax", "keras", "optax", "orbax-checkpoint"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out
