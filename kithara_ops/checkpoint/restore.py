"""Reading a checkpoint back into a run's state: a template in, a placed state out.

Restoring needs the state's template (shapes, dtypes and shardings of every array, the
variable keys in model order, and the optimizer adapter for a state that must be migrated
or started afresh), never the Trainer. Variable keys are matched by position (Keras may name
a rebuilt model's layers differently); the optimizer state is compared with what the current
optimizer would create, and a mismatch is an error that names both optimizers, unless the
caller asked for a fresh optimizer state or the two states can be translated
(``optim.migrate``). The arrays read are compared with the checksums their record holds: a
damaged array is an unreadable checkpoint, like a missing file.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import jax

from kithara_ops.checkpoint import saved_form
from kithara_ops.checkpoint.checkpointer import Checkpointer
from kithara_ops.checkpoint.integrity import checksums, signature
from kithara_ops.checkpoint.record import RunRecord
from kithara_ops.errors import ConfigError, first_line
from kithara_ops.models.hub import same_base
from kithara_ops.optim.migrate import migrate_state
from kithara_ops.state import TrainState, saved_part

log = logging.getLogger("kithara_ops.checkpoint")


@dataclasses.dataclass(frozen=True)
class StateTemplate:
    """What a restore needs to know of the run it restores into.

    Attributes:
      abstract: the ``TrainState`` as ``jax.ShapeDtypeStruct`` leaves with shardings.
      key_groups: the current variable keys by group, in the model's order.
      adapter: the current optimizer adapter (its description and ``init``, for migration).
      init_optimizer: a fresh, placed optimizer state for given parameters.
      base_model: the preset the current model was loaded from
        (``models.hub.base_model_of``), or ``None``.
      frozen_values: the current model's frozen weights (``key_groups["frozen"]``), placed:
        what fills in the part a checkpoint leaves out.
    """

    abstract: TrainState
    key_groups: dict[str, list[str]]
    adapter: Any
    init_optimizer: Callable[[dict], Any]
    base_model: dict[str, Any] | None = None
    frozen_values: Callable[[], dict[str, jax.Array]] | None = None


@dataclasses.dataclass(frozen=True)
class Restored:
    """A restored state, its record, and what happened to the optimizer state.

    Attributes:
      state: the train state, on the current mesh.
      record: the checkpoint's ``RunRecord``.
      optimizer_change: ``None``, ``"reset"`` or ``"migrated"``.
    """

    state: TrainState
    record: RunRecord
    optimizer_change: str | None = None

    @property
    def step(self) -> int:
        """The checkpoint's step."""
        return self.record.step


class UnreadableCheckpoint(Exception):
    """A checkpoint's files could not be read (damaged, missing or incomplete)."""


def _read(fn, *args):
    """Call a checkpoint-reading function, reporting any failure as ``UnreadableCheckpoint``."""
    try:
        return fn(*args)
    except ConfigError:
        raise
    except Exception as err:
        raise UnreadableCheckpoint(first_line(err)) from err


def _verified(step: int, state: Any, record: RunRecord) -> Any:
    """``state`` as read (saved keys), once its arrays match the record's checksums.

    A record written before checksums were taken (``checksums`` is ``None``) is not verified.
    """
    if record.checksums is None:
        return state
    for path, value in checksums(state).items():
        expected = record.checksums.get(path)
        if expected is not None and expected != value:
            raise UnreadableCheckpoint(f"step {step}: array {path} does not match its checksum")
    return state


def rename_keys(tree: Any, mapping: dict[str, str]) -> Any:
    """Rename dict keys found in ``mapping`` at any depth of a pytree."""
    if isinstance(tree, TrainState):
        return TrainState(
            *(rename_keys(getattr(tree, f.name), mapping) for f in dataclasses.fields(tree))
        )
    if isinstance(tree, dict):
        renamed = ((mapping.get(k, k), rename_keys(v, mapping)) for k, v in tree.items())
        # named_chain's state is an OrderedDict: the step's shardings expect one back.
        return type(tree)(renamed) if type(tree) is collections.OrderedDict else dict(renamed)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(rename_keys(v, mapping) for v in tree))
    if isinstance(tree, list | tuple):
        return type(tree)(rename_keys(v, mapping) for v in tree)
    return tree


def key_mapping(current: dict[str, list[str]], saved: dict[str, list[str]]) -> dict[str, str]:
    """Current key -> saved key, matched by position within each group of variables."""
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


def _split(sig: dict[str, tuple]) -> tuple[dict, dict]:
    """(model part, optimizer part) of a state signature."""
    model = {k: v for k, v in sig.items() if not k.startswith("opt_state")}
    return model, {k: v for k, v in sig.items() if k.startswith("opt_state")}


def _filler(
    step: int, record: RunRecord, template: StateTemplate, left_out: list[str]
) -> Callable[[TrainState], TrainState]:
    """Completes a restored state with the frozen weights its checkpoint left out.

    They come from the current model, which was loaded from the same base (checked by
    fingerprint before); a template that cannot supply them is refused in one line.
    """
    if not left_out:
        return lambda state: state
    handle = (record.base_model or {}).get("handle", "its base model")
    known = set(template.key_groups.get("frozen", ()))
    if template.frozen_values is None or not set(left_out) <= known:
        raise ConfigError(
            f"Checkpoint step {step} holds the changes to {handle!r}, not its frozen "
            f"weights: resume or export it with the model loaded from {handle!r}."
        )

    def fill(state: TrainState) -> TrainState:
        values = template.frozen_values()
        return dataclasses.replace(
            state, non_trainable={**state.non_trainable, **{k: values[k] for k in left_out}}
        )

    return fill


def restore(
    store: Checkpointer, step: int, template: StateTemplate, reset_optimizer: bool = False
) -> Restored:
    """Restore checkpoint ``step`` of ``store`` into ``template``'s structure and shardings."""
    record = _read(store.read_record, step)
    if not same_base(record.base_model, template.base_model):
        raise ConfigError(
            f"Checkpoint step {step} was trained on {record.base_model['handle']!r} "
            f"(fingerprint {record.base_model.get('fingerprint')}) but this run loads "
            f"{template.base_model['handle']!r} (fingerprint "
            f"{template.base_model.get('fingerprint')}): resume with the run's base model."
        )
    to_saved = key_mapping(template.key_groups, record.keys)
    to_current = {v: k for k, v in to_saved.items()}
    left_out = record.keys.get("frozen", [])
    abstract = saved_part(rename_keys(template.abstract, to_saved), left_out)
    fill = _filler(step, record, template, [to_current.get(k, k) for k in left_out])
    saved_structure = _read(store.saved_structure, step)
    saved_model, saved_opt = _split(signature(saved_structure))
    wanted_model, wanted_opt = _split(signature(saved_form.to_saved(abstract)))
    if saved_model != wanted_model:
        different = sorted(set(saved_model.items()) ^ set(wanted_model.items()))
        raise ConfigError(
            f"Checkpoint step {step} does not fit this model (first difference: "
            f"{different[0][0]}): resume with the model the run was started with."
        )
    if saved_opt == wanted_opt:
        state = _verified(step, _read(store.restore, step, abstract), record)
        return Restored(fill(rename_keys(state, to_current)), record)

    # The optimizer state differs: read it as saved (replicated), then migrate or reset it.
    replicated = jax.sharding.NamedSharding(
        template.abstract.step.sharding.mesh, jax.sharding.PartitionSpec()
    )
    as_saved = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated),
        saved_structure["opt_state"],
    )
    partial = dataclasses.replace(abstract, opt_state=as_saved)
    state = rename_keys(_verified(step, _read(store.restore, step, partial), record), to_current)
    state = fill(state)
    params_order = template.key_groups["params"]
    if not reset_optimizer:
        migrated = migrate_state(
            record.optimizer,
            state.opt_state,
            template.adapter,
            state.params,
            {"keys": record.keys},
            params_order,
        )
        if migrated is not None:
            shardings = jax.tree.map(lambda leaf: leaf.sharding, template.abstract.opt_state)
            opt_state = jax.device_put(migrated, shardings)
            return Restored(dataclasses.replace(state, opt_state=opt_state), record, "migrated")
    if reset_optimizer:
        opt_state = template.init_optimizer(state.params)
        return Restored(dataclasses.replace(state, opt_state=opt_state), record, "reset")
    from kithara_ops.optim.describe import describe_optimizer

    now = describe_optimizer(template.adapter.optimizer)
    raise ConfigError(
        f"Checkpoint step {step} was saved with optimizer "
        f"{record.optimizer.get('label', '?')!r} but this run uses {now['label']!r}, whose "
        "state differs: resume with the original optimizer, or pass --reset-optimizer "
        "(reset_optimizer=True) to keep the weights and step and start a fresh optimizer state."
    )


def resume_point(
    store: Checkpointer | None,
    template: Callable[[], StateTemplate],
    resume: bool | int | None,
    reset_optimizer: bool = False,
    overwrite: bool = False,
) -> Restored | None:
    """What a run starts from: ``None`` for a fresh start, else the restored checkpoint.

    A checkpoint directory belongs to one run: a fresh start into a directory that holds
    checkpoints is refused (they would be neither continued nor replaced), unless
    ``overwrite`` deletes them first.

    Args:
      store: the run's checkpointer (``None`` without a checkpoint directory).
      template: returns the state template (only called when there is something to restore).
      resume: ``False``/``None`` for a fresh start; ``True`` for the newest readable
        checkpoint, or a fresh start when the directory has none yet; a step number for
        that checkpoint.
      reset_optimizer: start a fresh optimizer state on the restored weights.
      overwrite: with a fresh start, delete the directory's checkpoints first.
    """
    if store is not None:
        _check_directory(store, fresh=not resume, overwrite=overwrite)
    if resume is False or resume is None:
        return None
    if store is None:
        raise ConfigError("resume needs a checkpoint directory: pass checkpoint_dir=DIR.")
    if resume is True and not store.steps():
        log.info("No checkpoint in %s yet: starting at step 0.", store.directory)
        return None
    return restore_latest(store, template(), resume, reset_optimizer)


def _check_directory(store: Checkpointer, fresh: bool, overwrite: bool) -> None:
    """Refuse a directory a fresh run would not own; ``overwrite`` deletes its checkpoints."""
    if jax.process_index() == 0:  # the process that takes the lock; the others follow it
        store.lock.check()  # a live writer's saves in progress are not foreign folders
    foreign = store.foreign()
    if foreign:
        raise ConfigError(
            f"Checkpoint directory {str(store.directory)!r} holds numbered folders that are not "
            f"checkpoints ({', '.join(foreign[:3])}): move them out or use another directory."
        )
    steps = store.steps()
    if not fresh or not steps:
        return
    if overwrite:
        log.warning("Deleting the checkpoints %s of %s (overwrite).", steps, store.directory)
        for step in steps:
            store.delete(step)
        return
    try:
        owner = store.read_record(steps[-1])
        who = f"run {owner.run_uid[:8]} ({owner.optimizer.get('label', '?')})"
    except Exception:
        who = "another run"
    raise ConfigError(
        f"Checkpoint directory {str(store.directory)!r} holds {who} up to step {steps[-1]}: "
        "pass --resume (resume=True) to continue it, --overwrite (overwrite=True) to replace "
        "it, or use another directory."
    )


def restore_latest(
    store: Checkpointer, template: StateTemplate, resume: bool | int, reset_optimizer: bool
) -> Restored:
    """Restore step ``resume``, or with ``resume=True`` the newest checkpoint that reads back.

    A damaged or incomplete newest checkpoint is reported and the one before it used; there
    is never a silent restart from step 0.
    """
    steps = store.steps()
    if resume is not True:
        if resume not in steps:
            raise ConfigError(
                f"No checkpoint at step {resume} in {str(store.directory)!r}; saved steps: "
                f"{', '.join(map(str, steps)) or 'none'}."
            )
        try:
            restored = restore(store, int(resume), template, reset_optimizer)
        except UnreadableCheckpoint as err:
            raise ConfigError(f"Checkpoint step {resume} cannot be read: {err}") from None
        return _drop_later(store, restored)
    for step in reversed(steps):
        try:
            return _drop_later(store, restore(store, step, template, reset_optimizer))
        except UnreadableCheckpoint as err:
            # Only unreadable files fall back; a mismatch or a bug is the same at every step.
            log.warning(
                "Checkpoint step %d in %s cannot be read (%s); using the one before it.",
                step, store.directory, err,
            )  # fmt: skip
    raise ConfigError(
        f"No readable checkpoint in {str(store.directory)!r}: every saved step is damaged."
    )


def _drop_later(store: Checkpointer, restored: Restored) -> Restored:
    """Delete checkpoints after the restored step: training will write those steps again.

    They are damaged ones passed over, or a branch the user chose to leave (resume=STEP);
    Orbax would otherwise refuse to save any step at or below the newest one.
    """
    later = [s for s in store.steps() if s > restored.step]
    if later:
        log.warning(
            "Continuing from step %d replaces the later checkpoints %s in %s.",
            restored.step, ", ".join(map(str, later)), store.directory,
        )  # fmt: skip
        for step in later:
            store.delete(step)
    return restored
