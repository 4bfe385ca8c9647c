"""Rebuilding a Trainer's state from a checkpoint, into the current mesh and model.

Restoring goes through the checkpoint's own record of what it holds: variable keys are
matched by position (Keras may name a rebuilt model's layers differently), the optimizer
state is compared with what the current optimizer would create, and a mismatch is an error
that names both optimizers, unless the caller asked for a fresh optimizer state or the two
optimizers' states can be translated (``optim.migrate``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import jax

from kithara_ops.checkpoint import Checkpointer, signature
from kithara_ops.errors import ConfigError
from kithara_ops.optim.migrate import migrate_state
from kithara_ops.state import TrainState

if TYPE_CHECKING:
    from kithara_ops.trainer import Trainer

log = logging.getLogger("kithara_ops.checkpoint")


@dataclasses.dataclass
class Restored:
    """A restored state, its metadata, and what happened to the optimizer state.

    Attributes:
      state: the train state, on the current mesh.
      meta: the checkpoint's JSON metadata.
      step: the checkpoint step.
      optimizer_change: ``None``, ``"reset"`` or ``"migrated"``.
    """

    state: TrainState
    meta: dict[str, Any]
    step: int
    optimizer_change: str | None = None


class UnreadableCheckpoint(Exception):
    """A checkpoint's files could not be read (damaged, missing or incomplete)."""


def _read(fn, *args):
    """Call a checkpoint-reading function, reporting any failure as ``UnreadableCheckpoint``."""
    try:
        return fn(*args)
    except Exception as err:
        raise UnreadableCheckpoint(
            str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        ) from err


def rename_keys(tree: Any, mapping: dict[str, str]) -> Any:
    """Rename dict keys found in ``mapping`` at any depth of a pytree."""
    if isinstance(tree, TrainState):
        return TrainState(
            *(rename_keys(getattr(tree, f.name), mapping) for f in dataclasses.fields(tree))
        )
    if isinstance(tree, dict):
        return {mapping.get(k, k): rename_keys(v, mapping) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(rename_keys(v, mapping) for v in tree))
    if isinstance(tree, list | tuple):
        return type(tree)(rename_keys(v, mapping) for v in tree)
    return tree


def key_mapping(trainer: Trainer, meta: dict) -> dict[str, str]:
    """Current key -> saved key, matched by position within each group of variables."""
    saved = meta.get("keys", {})
    current = trainer.variable_key_groups()
    mapping = {}
    for group, keys in current.items():
        old = saved.get(group)
        if old is None:
            continue
        if len(old) != len(keys) and group != "opt":
            raise ConfigError(
                f"The checkpoint holds {len(old)} {group} variables but the model has "
                f"{len(keys)}: it was saved from a different model."
            )
        if len(old) == len(keys):
            mapping.update(zip(keys, old))
    return mapping


def _subtree(sig: dict[str, tuple], prefix: str) -> dict[str, tuple]:
    return {k: v for k, v in sig.items() if k.startswith(prefix + "/") or k == prefix}


def restore(
    trainer: Trainer, checkpointer: Checkpointer, step: int, reset_optimizer: bool = False
) -> Restored:
    """Restore checkpoint ``step`` into ``trainer``'s model, optimizer and mesh."""
    meta = _read(checkpointer.read_meta, step)
    to_saved = key_mapping(trainer, meta)
    to_current = {v: k for k, v in to_saved.items()}
    abstract = rename_keys(trainer.abstract_state(), to_saved)
    saved_sig = _read(checkpointer.state_signature, step)
    model_part = {k: v for k, v in saved_sig.items() if not k.startswith("opt_state")}
    wanted = signature(abstract)
    if model_part != {k: v for k, v in wanted.items() if not k.startswith("opt_state")}:
        different = sorted(
            set(model_part.items())
            ^ {(k, v) for k, v in wanted.items() if not k.startswith("opt_state")}
        )
        raise ConfigError(
            f"Checkpoint step {step} does not fit this model (first difference: "
            f"{different[0][0]}): resume with the model the run was started with."
        )
    if _subtree(saved_sig, "opt_state") == _subtree(wanted, "opt_state"):
        state = rename_keys(_read(checkpointer.restore_state, step, abstract), to_current)
        return Restored(state, meta, step)

    # The optimizer state differs: read it as saved, then migrate it or start afresh.
    saved_opt = _read(_abstract_from_metadata, checkpointer, step, trainer)
    partial = dataclasses.replace(abstract, opt_state=saved_opt)
    state = rename_keys(_read(checkpointer.restore_state, step, partial), to_current)
    saved_optimizer = meta.get("optimizer", {})
    migrated = None
    if not reset_optimizer:
        migrated = migrate_state(
            saved_optimizer,
            state.opt_state,
            trainer.adapter,
            state.params,
            meta,
            trainer.param_keys,
        )
    if migrated is not None:
        opt_state = jax.device_put(migrated, trainer.state_shardings.opt_state)
        return Restored(dataclasses.replace(state, opt_state=opt_state), meta, step, "migrated")
    if reset_optimizer:
        opt_state = trainer.init_optimizer_state(state.params)
        return Restored(dataclasses.replace(state, opt_state=opt_state), meta, step, "reset")
    from kithara_ops.optim.describe import describe_optimizer

    now = describe_optimizer(trainer.adapter.optimizer)
    raise ConfigError(
        f"Checkpoint step {step} was saved with optimizer {saved_optimizer.get('label', '?')!r} "
        f"but this run uses {now['label']!r}, whose state differs: resume with the original "
        "optimizer, or pass --reset-optimizer (reset_optimizer=True) to keep the weights and "
        "step and start a fresh optimizer state."
    )


def _abstract_from_metadata(checkpointer: Checkpointer, step: int, trainer: Trainer) -> Any:
    """The saved optimizer state's structure, to read it replicated on the current mesh."""
    metadata = checkpointer.manager.item_metadata(step)["state"]
    opt = metadata["opt_state"]
    replicated = jax.sharding.NamedSharding(trainer.mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated), opt
    )


def restore_latest(
    trainer: Trainer, checkpointer: Checkpointer, resume: bool | int, reset_optimizer: bool
) -> Restored:
    """Restore step ``resume``, or with ``resume=True`` the newest checkpoint that reads back.

    A damaged or incomplete newest checkpoint is reported and the one before it used; there
    is never a silent restart from step 0.
    """
    steps = checkpointer.steps()
    if resume is not True:
        if resume not in steps:
            raise ConfigError(
                f"No checkpoint at step {resume} in {str(checkpointer.directory)!r}; saved steps: "
                f"{', '.join(map(str, steps)) or 'none'}."
            )
        try:
            restored = restore(trainer, checkpointer, int(resume), reset_optimizer)
        except UnreadableCheckpoint as err:
            raise ConfigError(f"Checkpoint step {resume} cannot be read: {err}") from None
        return _drop_later(checkpointer, restored)
    for step in reversed(steps):
        try:
            return _drop_later(checkpointer, restore(trainer, checkpointer, step, reset_optimizer))
        except UnreadableCheckpoint as err:
            # Only unreadable files fall back; a mismatch or a bug is the same at every step.
            log.warning(
                "Checkpoint step %d in %s cannot be read (%s); using the one before it.",
                step, checkpointer.directory, err,
            )  # fmt: skip
    raise ConfigError(
        f"No readable checkpoint in {str(checkpointer.directory)!r}: every saved step is damaged."
    )


def _drop_later(checkpointer: Checkpointer, restored: Restored) -> Restored:
    """Delete checkpoints after the restored step: training will write those steps again.

    They are damaged ones passed over, or a branch the user chose to leave (resume=STEP);
    Orbax would otherwise refuse to save any step at or below the newest one.
    """
    later = [s for s in checkpointer.steps() if s > restored.step]
    if later:
        log.warning(
            "Continuing from step %d replaces the later checkpoints %s in %s.",
            restored.step, ", ".join(map(str, later)), checkpointer.directory,
        )  # fmt: skip
        for step in later:
            checkpointer.manager.delete(step)
    return restored
