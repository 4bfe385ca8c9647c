"""Orbax checkpoints of the whole train state plus its ``RunRecord``.

One ``CheckpointManager`` step directory per save, holding two items:

- ``state``: the ``TrainState`` pytree (parameters, non-trainable variables, the optimizer
  state, step, RNG key), written from every host with its shardings, never gathered. A
  model loaded from a preset leaves out its frozen weights (a LoRA model's base, the
  record's ``keys["frozen"]``): the preset holds them, and its handle and fingerprint are
  in the record, so a LoRA checkpoint is the size of its adapters and their optimizer state;
- ``meta``: the ``RunRecord`` as JSON (see ``checkpoint.record``).

Orbax writes each save to a temporary directory and renames it when complete, so a save that
dies half-way is never listed as a checkpoint. Saves are asynchronous: the loop goes on while
the previous save is written; a save that fails in the background (a full disk, a directory
gone) stops the run at the next save or at the end as ``CheckpointWriteError``, and its
temporary directory is removed.

Orbax verifies no array data when it reads a checkpoint, so each record holds a checksum of
every array of the state (``checksums``), computed on the devices at save time; a restore
compares the arrays it read against them (see ``restore``).

``Checkpointer`` is both the sink that saves (it reads only the events the Trainer hands it)
and the store a resume reads through (``steps``, ``read_record``, ``saved_structure``,
``restore``, ``delete``), so one resume opens one manager. Which checkpoints are kept is
decided here, not by Orbax, so that a resume can open the directory before it knows the
run's settings (they are in the checkpoint's record) and set them afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from kithara_ops.callbacks import Callback, RunInfo, StepRecord, TrainResult
from kithara_ops.checkpoint.integrity import by_path, checksum_arrays
from kithara_ops.checkpoint.lock import DirectoryLock
from kithara_ops.checkpoint.record import RunRecord, new_record
from kithara_ops.checkpoint.saved_form import from_saved, to_saved
from kithara_ops.errors import CheckpointWriteError, first_line
from kithara_ops.state import all_finite, saved_part
from kithara_ops.stopping import Bests

log = logging.getLogger("kithara_ops.checkpoint")


class Checkpointer(Callback):
    """Saves checkpoints every ``save_every`` steps and at the end; reads them back.

    Args:
      directory: the checkpoint directory (created if missing).
      save_every: steps between saves (``None``: only the final save).
      save_every_minutes: minutes between saves, besides ``save_every`` (``None``: the
        run's ``config.save_every_minutes``).
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
        save_every_minutes: float | None = None,
    ):
        self.directory = Path(directory).absolute()
        self.configure(save_every, keep, keep_best)
        self.save_every_minutes = save_every_minutes
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
        self._minutes: float | None = None
        self._saved_at = 0.0  # seconds since train start of the last save
        self._writing: int | None = None  # the step a background save is writing
        self.on_saved: Callable[[int, str], None] | None = None  # told of each complete save
        self._failed = False
        self.lock = DirectoryLock(self.directory)

    def configure(self, save_every: int | None, keep: int, keep_best: bool) -> None:
        """Set how often to save and what to keep (known only once a run's record is read)."""
        self.save_every, self.keep, self.keep_best = save_every, keep, keep_best

    # ------------------------------------------------------------------ the sink
    def on_train_start(self, run: RunInfo) -> None:
        if jax.process_index() == 0:
            self.lock.acquire()
        self._run, self._last = run, None
        self._minutes = self.save_every_minutes or getattr(run.config, "save_every_minutes", None)
        self._saved_at, self._failed = 0.0, False
        resumed = run.resumed_from
        self._loss = resumed.loss if resumed else None
        self._eval_loss = resumed.eval_loss if resumed else None
        self._bests = Bests.from_json(
            resumed.bests if resumed else None, run.config.target_eval_loss
        )

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        self._loss = metrics.get("loss", self._loss)
        self._bests.saw_loss(step, self._loss)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._eval_loss = metrics.get("eval_loss", self._eval_loss)
        config = self._run.config
        self._bests.saw_eval(
            step, self._eval_loss, config.early_stop_min_delta, config.target_eval_loss
        )

    def on_step(self, record: StepRecord) -> None:
        self._last = record
        due = bool(self.save_every) and record.step % self.save_every == 0
        began = time.perf_counter()
        saved = (due or self._time_is_up(record)) and self.save(
            record.step, record.state, self._record(record)
        )
        if saved:
            # Counted from when the save let the loop go on: a slow save is no training time.
            self._saved_at = record.seconds + time.perf_counter() - began
        if record.step == self._run.total_steps or record.stopping:
            # The run's last step is saved and written here rather than at the end, so that a
            # save that fails fails the step: the run then ends FAILED for every sink.
            self.save(record.step, record.state, self._record(record))
            self._finish_writes()

    def _time_is_up(self, record: StepRecord) -> bool:
        """Whether ``save_every_minutes`` have passed since the last save.

        A save is collective, so every process must decide alike although their clocks
        differ: with several processes the decision is taken at logging steps only (where
        the processes meet anyway) from process 0's clock, and broadcast to the others.
        """
        if not self._minutes:
            return False
        if jax.process_count() == 1:
            return record.seconds - self._saved_at >= 60.0 * self._minutes
        if record.step % self._run.config.log_every:
            return False
        import numpy as np
        from jax.experimental import multihost_utils

        late = np.int32(record.seconds - self._saved_at >= 60.0 * self._minutes)
        return bool(multihost_utils.broadcast_one_to_all(late))

    def on_train_end(self, status: str, result: TrainResult | None) -> None:
        # The last state seen is saved unless a failed step already consumed (donated) it,
        # or a save already failed (the directory cannot be written).
        last = self._last
        saveable = last is not None and status in ("FINISHED", "KILLED") and not self._failed
        try:
            if saveable and not any(leaf.is_deleted() for leaf in jax.tree.leaves(last.state)):
                self.save(last.step, last.state, self._record(last))
            if not self._failed:
                self._finish_writes()
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
            base_model=run.base_model,
            data_digest=(run.data or {}).get("digest"),
            given=run.given,
            bests=self._bests.to_json(),
            stop_reason=step.stop_reason,
        )

    def save(self, step: int, state: Any, record: RunRecord) -> bool:
        """Save ``state`` and its ``record`` as step ``step``; whether it was saved.

        The non-trainable entries ``record.keys["frozen"]`` names are left out.

        A step already saved is not saved again, and a state holding a NaN or an infinity
        is never saved: the checkpoints before it stay the run's good ones.
        """
        if step in self.manager.all_steps():
            return False
        state = saved_part(state, record.keys.get("frozen", ()))
        # One fetch from the devices for both: a save waits for the step anyway.
        finite, sums = jax.device_get((all_finite(state), checksum_arrays(state)))
        if not bool(finite):
            log.warning("Step %d's state is not finite: it was not checkpointed.", step)
            return False
        record = dataclasses.replace(record, checksums=by_path(state, sums))
        # The previous save must be complete before it may be counted (Orbax waits for it
        # before starting another anyway).
        self._finish_writes()
        self._rotate()
        self._eval_of[step] = record.eval_loss
        self._writing = step
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(to_saved(state)),
                    meta=ocp.args.JsonSave(record.to_json()),
                ),
            )
        except Exception as err:
            raise self._write_error(err) from err
        return True

    def _finish_writes(self) -> None:
        """Wait for the save in flight; its failure (raised here by Orbax) stops the run."""
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            raise self._write_error(err) from err
        done, self._writing = self._writing, None
        if done is not None and self.on_saved is not None and jax.process_index() == 0:
            self.on_saved(done, str(self.directory / str(done)))

    def _write_error(self, err: Exception) -> CheckpointWriteError:
        """The one-line error of a failed save, once its leftovers are removed."""
        self._failed = True
        step, self._writing = self._writing, None
        if jax.process_index() == 0:
            # Orbax leaves a failed save's temporary folder behind; it is no checkpoint.
            for leftover in self.directory.glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(leftover, ignore_errors=True)
        try:
            kept = self.steps()
        except Exception:  # the directory itself may be gone
            kept = []
        last = f"step {kept[-1]} is the last complete one" if kept else "none is complete"
        return CheckpointWriteError(
            f"checkpoint step {step} could not be written to {str(self.directory)!r} "
            f"({_cause(err)}); {last}: free space or fix the directory, then resume."
        )

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
        """Wait for the saves in flight to be complete.

        Raises:
          CheckpointWriteError: a background save failed.
        """
        if not self._failed:
            self._finish_writes()

    def close(self) -> None:
        """Wait for pending saves and release the manager."""
        try:
            self.wait()
        finally:
            self.manager.close()

    # ------------------------------------------------------------------ the store
    def steps(self) -> list[int]:
        """Complete checkpoints this directory holds, oldest first.

        Only step folders a save wrote to count (complete or damaged): a numbered folder of
        anything else is not a checkpoint, and is never read or deleted.
        """
        return sorted(s for s in self.manager.all_steps() if self._is_checkpoint(s))

    def refresh(self) -> None:
        """Read the directory's checkpoints again: a run writing there saves and rotates
        them while this process reads (Orbax lists them once, when the manager opens)."""
        self.manager.reload()

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
        values = restored["meta"]
        if not isinstance(values, dict) or "step" not in values:
            # Damage, not a user's mistake: a resume passes over it like unreadable files.
            raise ValueError(f"the record of step {step} is not a run record")
        return RunRecord.from_json(dict(values))

    def saved_structure(self, step: int) -> Any:
        """The saved state's tree of array metadata (shape, dtype), without reading arrays."""
        return self.manager.item_metadata(step)["state"]

    def restore(self, step: int, template: Any) -> Any:
        """Read a checkpoint's state into ``template``'s structure, shapes and shardings."""
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(to_saved(template)))
        )
        return from_saved(restored["state"], template)

    def delete(self, step: int) -> None:
        """Delete one saved checkpoint (a folder that is not a checkpoint is never deleted)."""
        if not self._is_checkpoint(step):
            raise ValueError(f"{self.directory / str(step)} is not a checkpoint: not deleting it")
        self.manager.delete(step)


def _cause(err: BaseException) -> str:
    """Why a write failed, shortly: the operating system's reason when there is one.

    TensorStore's errors start with the whole key and file path and give the reason last
    (``... No space left on device [os_error_code='28']``); Python's give it as ``strerror``.
    """
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        code = re.search(r"os_error_code='?(\d+)|OS error (\d+)", str(seen))
        if code:
            return os.strerror(int(code.group(1) or code.group(2)))
        seen = seen.__cause__ or seen.__context__
    return first_line(err, 160)


def _eval_loss_of(store: Checkpointer, step: int) -> float | None:
    """A saved step's ``eval_loss``, ``None`` if it has none or its record is unreadable."""
    try:
        return store.read_record(step).eval_loss
    except Exception:  # an unreadable record ranks last and goes first
        return None
