"""Orbax checkpoints of the whole train state, and reading them back for a resume.

One ``CheckpointManager`` step directory per save, holding two items:

- ``state``: the ``TrainState`` pytree (parameters, non-trainable variables, the optimizer
  state, step, RNG key), written from every host with its shardings, never gathered;
- ``meta``: small JSON: epoch, data position, last metrics, the run config, the optimizer
  description, the MLflow run id and tracking URI, library versions, and the order of the
  variable keys (Keras renames layers between sessions; the order does not change).

Orbax writes each save to a temporary directory and renames it when complete, so a save that
dies half-way is never listed as a checkpoint. Saves are asynchronous: the loop goes on while
the previous save is written.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from kithara_ops.callbacks import Callback, RunInfo, TrainResult
from kithara_ops.state import TrainState

log = logging.getLogger("kithara_ops.checkpoint")


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


class Checkpointer(Callback):
    """Saves checkpoints every ``save_every`` steps and at the end; restores them.

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
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            best_fn=(lambda metrics: metrics["eval_loss"]) if keep_best else None,
            best_mode="min",
            create=True,
        )
        # Handlers named up front, so metadata can be read before anything is restored.
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )
        self.run: RunInfo | None = None
        self._last: tuple[int, TrainState] | None = None

    # ------------------------------------------------------------------ saving
    def on_train_start(self, run: RunInfo) -> None:
        self.run = run

    def on_step(self, step: int, state: TrainState) -> None:
        self._last = (step, state)
        if self.save_every and step % self.save_every == 0:
            self.save(step, state)

    def on_train_end(self, status: str, result: TrainResult | None) -> None:
        # The last state seen is saved unless a failed step already consumed (donated) it.
        if self._last is not None and status in ("FINISHED", "KILLED"):
            step, state = self._last
            if not any(leaf.is_deleted() for leaf in jax.tree.leaves(state)):
                self.save(step, state)
        self.manager.wait_until_finished()

    def save(self, step: int, state: TrainState) -> None:
        """Save ``state`` as step ``step`` (a no-op if that step is already saved)."""
        if step in self.manager.all_steps():
            return
        meta = self.run.progress() if self.run is not None else {}
        meta = {**meta, "step": step, "saved_at": _now(), "versions": versions()}
        metrics = None
        if self.manager._options.best_fn is not None:
            eval_loss = meta.get("eval_loss")
            metrics = {"eval_loss": eval_loss} if eval_loss is not None else None
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            metrics=metrics,
        )

    def close(self) -> None:
        """Wait for pending saves and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()

    # ------------------------------------------------------------------ reading
    def steps(self) -> list[int]:
        """Complete checkpoints, oldest first."""
        return sorted(self.manager.all_steps())

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON metadata of one checkpoint."""
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def state_signature(self, step: int) -> dict[str, tuple]:
        """``{leaf path: (shape, dtype)}`` of a checkpoint's saved state, without reading it."""
        metadata = self.manager.item_metadata(step)["state"]
        return signature(metadata)

    def restore_state(self, step: int, abstract: Any) -> Any:
        """Read a checkpoint's state into ``abstract``'s structure, shapes and shardings."""
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        return restored["state"]


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


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
