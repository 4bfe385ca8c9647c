"""The one place that creates a run's sinks: tracker, checkpointer, progress display.

The Trainer reports to whatever it is handed; which sinks exist, and in what order they
hear each event, is decided here from the ``RunConfig``. The checkpointer comes first, so
that at the end of a run (or on a signal) the final checkpoint is written before the
tracker waits for MLflow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kithara_ops.callbacks import Callback, CallbackList
from kithara_ops.config import RunConfig

if TYPE_CHECKING:
    from kithara_ops.checkpoint.checkpointer import Checkpointer
    from kithara_ops.tracking import MlflowTracker


@dataclasses.dataclass
class Sinks:
    """A run's sinks, in the order they hear each event.

    Attributes:
      callbacks: every sink, in order (the checkpointer, the tracker, the progress display,
        then the caller's callbacks).
      checkpoints: the checkpointer, also the store a resume reads from; ``None`` without a
        ``checkpoint_dir``.
      tracker: the MLflow tracker; ``None`` with ``tracking=False``.
    """

    callbacks: list[Callback]
    checkpoints: Checkpointer | None = None
    tracker: MlflowTracker | None = None


def build_sinks(
    config: RunConfig,
    callbacks: Sequence[Callback] = (),
    *,
    progress: bool = False,
    checkpoints: Checkpointer | None = None,
) -> Sinks:
    """The sinks ``config`` asks for, followed by ``callbacks``.

    Args:
      config: the run's config (``checkpoint_dir``, ``save_every``, ``keep``, ``keep_best``,
        ``tracking`` and the MLflow settings).
      callbacks: the caller's own callbacks, called after the built-in sinks.
      progress: add a terminal progress bar.
      checkpoints: an already open checkpointer for ``config.checkpoint_dir`` (a resume that
        has read the run's record through it), so one directory has one manager.
    """
    if checkpoints is None and config.checkpoint_dir:
        from kithara_ops.checkpoint.checkpointer import Checkpointer

        checkpoints = Checkpointer(
            config.checkpoint_dir, config.save_every, config.keep, config.keep_best
        )
    tracker = None
    if config.tracking:
        from kithara_ops.tracking import MlflowTracker

        tracker = MlflowTracker(config)
    shown = []
    if progress:
        from kithara_ops.progress import ProgressBar

        shown.append(ProgressBar())
    ordered = [s for s in (checkpoints, tracker) if s is not None] + shown + list(callbacks)
    if checkpoints is not None:
        # The one event a sink starts: the others hear of each complete checkpoint.
        checkpoints.on_saved = CallbackList(
            [s for s in ordered if s is not checkpoints]
        ).on_checkpoint
    if config.profile_steps is not None:
        from kithara_ops.profiling import Profiler

        # Files a sink writes for the run's record go to the others (the tracker logs them).
        profiler = Profiler(config.profile_steps)
        profiler.publish = CallbackList(list(ordered)).on_artifacts
        ordered.append(profiler)
    if config.step_timeout is not None:
        from kithara_ops.watchdog import Watchdog

        # The other event a sink starts: the watchdog tells the others that the run hangs.
        ordered.append(Watchdog(config.step_timeout, notify=CallbackList(ordered).on_hang))
    return Sinks(ordered, checkpoints, tracker)
