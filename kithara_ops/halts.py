"""Why a run stops before its last step, decided alike on every process.

A stop signal (SIGTERM, Ctrl-C) or a sink that failed (a store that cannot take a checkpoint)
stops the run after the current step. With several processes they agree at logging steps, so
every process stops after the same step. A divergence or a failed store becomes the error
the loop raises, naming the last complete checkpoint.
"""

from __future__ import annotations

from typing import Any

import jax

from kithara_ops import distributed
from kithara_ops.errors import Diverged, StoreFailed
from kithara_ops.interrupt import TrainingStopped


def _agreeing_step(step: int, total: int, log_every: int) -> bool:
    """Whether the processes compare notes at ``step`` (always, with one process)."""
    return jax.process_count() == 1 or step % log_every == 0 or step == total


def stop_signal(signum: int | None, step: int, total: int, log_every: int) -> int | None:
    """The signal to stop on after ``step`` (``signum`` is this process's, or ``None``)."""
    if not _agreeing_step(step, total, log_every):
        return None
    return distributed.agreed_signal(signum)


class SignalWatch:
    """A question asked between evaluation batches: have the processes agreed to stop?

    ``stop`` is the run's ``StopRequests``; the first signal agreed on is kept in
    ``signum``, so every process ends the pass after the same batch.
    """

    def __init__(self, stop: Any):
        self.stop, self.signum = stop, None

    def __call__(self) -> bool:
        if self.signum is None:
            self.signum = distributed.agreed_signal(self.stop.signum)
        return self.signum is not None


def sink_failure(failure: Exception | None, step: int, total: int, log_every: int):
    """A sink's reason to stop after ``step``; with several processes, agreed on."""
    if jax.process_count() == 1:
        return failure
    if not _agreeing_step(step, total, log_every):
        return None
    if distributed.agreed_signal(1 if failure is not None else None) is None:
        return None
    return failure or StoreFailed("a store that process 0 reports to failed")


def last_checkpoint(store: Any) -> int | None:
    """The newest complete checkpoint's step, once the save in flight is written."""
    saved = (store.wait() or store.steps()) if store is not None else []
    return saved[-1] if saved else None


def diverged(store: Any, step: int, reason: str) -> Diverged:
    """The error of a run that stopped being finite at ``step``."""
    return Diverged(step, reason, last_checkpoint(store), store and store.directory)


def store_failed(store: Any, step: int, failure: Exception) -> StoreFailed:
    """The error of a run stopped after ``step`` because a store failed."""
    saved = last_checkpoint(store)
    where = (
        f"step {saved} is checkpointed in {str(store.directory)!r}"
        if saved is not None
        else "no checkpoint was saved"
    )
    return StoreFailed(
        f"{failure}; the run stopped after step {step} and {where}: fix the store or "
        "choose another, then resume."
    )


def halted(store: Any, step: int, failure: Exception | None, signum: int | None) -> Exception:
    """The error that ends a run halted after ``step``: a failed store's, else the signal's."""
    return store_failed(store, step, failure) if failure else TrainingStopped(signum, step)
