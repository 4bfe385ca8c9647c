"""Orbax checkpoints of the whole train state plus its ``RunRecord``.

One ``CheckpointManager`` step directory per save, holding two items:

- ``state``: the ``TrainState`` pytree (parameters, non-trainable variables, the optimizer
  state, step, RNG key), written from every host with its shardings, never gathered;
- ``meta``: the ``RunRecord`` as JSON (see ``run_record``).

Orbax writes each save to a temporary directory and renames it when complete, so a save that
dies half-way is never listed as a checkpoint. Saves are asynchronous: the loop goes on while
the previous save is written.

``Checkpointer`` is both the sink that saves (it reads only the events the Trainer hands it)
and the store a resume reads through (``steps``, ``read_record``, ``saved_structure``,
``restore``, ``delete``), so one resume opens one manager. Which checkpoints are kept is
decided here, not by Orbax, so that a resume can open the directory before it knows the
run's settings (they are in the checkpoint's record) and set them afterwards.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from kithara_ops.callbacks import Callback, RunInfo, StepRecord, TrainResult
from kithara_ops.run_lock import DirectoryLock
from kithara_ops.run_record import RunRecord, new_record
from kithara_ops.state import all_finite

log = logging.getLogger("kithara_ops.checkpoint")


class Checkpointer(Callback):
    """Saves checkpoints every ``save_every`` steps and at the end; reads them back.

    Args:
      directory: the checkpoint directory (created if missing).
      save_every: steps between saves (``None``: only the final save).
      keep: how many checkpoints to keep (oldest deleted first; or worst, with ``keep_best``).
      keep_best: keep the ``keep`` checkpoints with the lowest ``eval_loss`` instead.
      async_save: write in the background while training goes on.
    """

    def __init__(
        self,
        directory: str | Path,
        save_every: int | None = None,
        keep: int = 3,
        keep_best: bool = False,
        async_save: bool = True,
    ):
        self.directory = Path(directory).absolute()
        self.configure(save_every, keep, keep_best)
        options = ocp.CheckpointManagerOptions(enable_async_checkpointing=async_save, create=True)
        # Handlers named up front, so records can be read before anything is restored.
        # Orbax warns of every numbered folder without its metadata as it opens a
        # directory; those are told apart here (``foreign``), in one line where it matters.
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.ERROR)
        try:
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=options,
                item_handlers={
                    "state": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler(),
                },
            )
        finally:
            absl.setLevel(level)
        self._run: RunInfo | None = None
        self._last: StepRecord | None = None
        self._loss: float | None = None
        self._eval_loss: float | None = None
        self._eval_of: dict[int, float | None] = {}
        self.lock = DirectoryLock(self.directory)

    def configure(self, save_every: int | None, keep: int, keep_best: bool) -> None:
        """Set how often to save and what to keep (known only once a run's record is read)."""
        self.save_every, self.keep, self.keep_best = save_every, keep, keep_best

    # ------------------------------------------------------------------ the sink
    def on_train_start(self, run: RunInfo) -> None:
        if jax.process_index() == 0:
            self.lock.acquire()
        self._run, self._last = run, None
        resumed = run.resumed_from
        self._loss = resumed.loss if resumed else None
        self._eval_loss = resumed.eval_loss if resumed else None

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        self._loss = metrics.get("loss", self._loss)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._eval_loss = metrics.get("eval_loss", self._eval_loss)

    def on_step(self, record: StepRecord) -> None:
        self._last = record
        if self.save_every and record.step % self.save_every == 0:
            self.save(record.step, record.state, self._record(record))

    def on_train_end(self, status: str, result: TrainResult | None) -> None:
        # The last state seen is saved unless a failed step already consumed (donated) it.
        last = self._last
        saveable = last is not None and status in ("FINISHED", "KILLED")
        if saveable and not any(leaf.is_deleted() for leaf in jax.tree.leaves(last.state)):
            self.save(last.step, last.state, self._record(last))
        try:
            self.manager.wait_until_finished()
            self._rotate()
        finally:
            self.lock.release()

    def _record(self, step: StepRecord) -> RunRecord:
        run = self._run
        return new_record(
            step.step,
            run_uid=run.run_uid,
            config=run.config,
            optimizer=run.description,
            keys=run.key_groups,
            data_position=step.data_position,
            loss=self._loss,
            eval_loss=self._eval_loss,
        )

    def save(self, step: int, state: Any, record: RunRecord) -> bool:
        """Save ``state`` and its ``record`` as step ``step``; whether it was saved.

        A step already saved is not saved again, and a state holding a NaN or an infinity
        is never saved: the checkpoints before it stay the run's good ones.
        """
        if step in self.manager.all_steps():
            return False
        if not bool(all_finite(state)):
            log.warning("Step %d's state is not finite: it was not checkpointed.", step)
            return False
        # The previous save must be complete before it may be counted (Orbax waits for it
        # before starting another anyway).
        self.manager.wait_until_finished()
        self._rotate()
        self._eval_of[step] = record.eval_loss
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(record.to_json())
            ),
        )
        return True

    def _rotate(self) -> None:
        """Delete complete checkpoints beyond ``keep``: the oldest, or with ``keep_best`` all
        but the ``keep`` lowest ``eval_loss`` (those without one go first). The newest is
        always kept besides: it is where a resume continues."""
        steps = self.steps()
        if len(steps) <= self.keep:
            return
        kept = set(steps[-self.keep :])
        if self.keep_best:
            for step in steps:
                if step not in self._eval_of:
                    self._eval_of[step] = _eval_loss_of(self, step)
            evals = self._eval_of
            ranked = sorted(steps, key=lambda s: (evals[s] is None, evals[s] or 0.0, -s))
            kept = {*ranked[: self.keep], steps[-1]}
        for step in steps:
            if step not in kept:
                self.delete(step)

    def wait(self) -> None:
        """Wait for the saves in flight to be complete."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()

    # ------------------------------------------------------------------ the store
    def steps(self) -> list[int]:
        """Complete checkpoints this directory holds, oldest first.

        Only step folders a save wrote to count (complete or damaged): a numbered folder of
        anything else is not a checkpoint, and is never read or deleted.
        """
        return sorted(s for s in self.manager.all_steps() if self._is_checkpoint(s))

    def foreign(self) -> list[str]:
        """Numbered folders that are not checkpoints (Orbax would count them as steps)."""
        return [str(s) for s in sorted(self.manager.all_steps()) if not self._is_checkpoint(s)]

    def _is_checkpoint(self, step: int) -> bool:
        # Any trace of a save (Orbax's step metadata or one of the two items) makes a folder
        # ours, damaged or not: a damaged one is reported and passed over, and may be
        # replaced; a folder with none of them was never written here.
        folder = self.directory / str(step)
        marks = ("_CHECKPOINT_METADATA", "state", "meta")
        return any((folder / mark).exists() for mark in marks)

    def read_record(self, step: int) -> RunRecord:
        """The ``RunRecord`` of one checkpoint (migrated if an older release wrote it)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return RunRecord.from_json(dict(restored["meta"]))

    def saved_structure(self, step: int) -> Any:
        """The saved state's tree of array metadata (shape, dtype), without reading arrays."""
        return self.manager.item_metadata(step)["state"]

    def restore(self, step: int, template: Any) -> Any:
        """Read a checkpoint's state into ``template``'s structure, shapes and shardings."""
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(template))
        )
        return restored["state"]

    def delete(self, step: int) -> None:
        """Delete one saved checkpoint (a folder that is not a checkpoint is never deleted)."""
        if not self._is_checkpoint(step):
            raise ValueError(f"{self.directory / str(step)} is not a checkpoint: not deleting it")
        self.manager.delete(step)


def _eval_loss_of(store: Checkpointer, step: int) -> float | None:
    """A saved step's ``eval_loss``, ``None`` if it has none or its record is unreadable."""
    try:
        return store.read_record(step).eval_loss
    except Exception:  # an unreadable record ranks last and goes first
        return None


def signature(tree: Any) -> dict[str, tuple]:
    """``{normalised leaf path: (shape, dtype)}``; the same for a live tree and Orbax metadata.

    Orbax stores NamedTuples as dicts and tuples as lists, so paths are compared by their
    keys and indices only.
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path(path): (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in leaves}


def _path(path) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
    return "/".join(parts)
