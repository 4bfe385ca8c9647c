"""The narrow interface through which the Trainer reports to everything else.

Trackers, checkpointers and progress displays subclass ``Callback`` and override the events
they care about. The Trainer calls them; they never drive the Trainer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras

    from kithara_ops.config import RunConfig
    from kithara_ops.state import TrainState


@dataclasses.dataclass
class RunInfo:
    """What a callback may know about a run when it starts.

    Attributes:
      config: the run's resolved configuration.
      model: the Keras model being trained.
      optimizer: the optimizer object as the user passed it.
      optimizer_family: ``"keras"`` or ``"optax"``.
      num_params: number of trainable parameters.
      mesh_shape: ``{"data": n, "fsdp": m}``.
      start_step: the step training starts from (0, or the restored step).
      total_steps: the step training stops at.
      progress: returns the run's position as JSON-safe values (epoch, data position, last
        metrics, MLflow run), for checkpoints.
    """

    config: RunConfig
    model: keras.Model
    optimizer: Any
    optimizer_family: str
    num_params: int
    mesh_shape: dict[str, int]
    start_step: int
    total_steps: int
    progress: Callable[[], dict] = dict


@dataclasses.dataclass
class TrainResult:
    """What ``Trainer.train()`` returns.

    Attributes:
      step: the last step trained.
      loss: training loss at the last logged step.
      eval_loss: the last evaluation loss, or ``None`` without eval data.
      seconds: wall time of ``train()``.
      compile_seconds: time to compile and run the first step.
      metrics: the last logged metrics, by name.
      run_id: the MLflow run id, when the run was tracked.
    """

    step: int
    loss: float | None
    eval_loss: float | None
    seconds: float
    compile_seconds: float = 0.0
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    run_id: str | None = None


class Callback:
    """Base class: every event is a no-op until overridden."""

    def on_train_start(self, run: RunInfo) -> None:
        """Before the first step."""

    def on_step(self, step: int, state: TrainState) -> None:
        """After every step. ``state`` is still on the devices: do not fetch it every step."""

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """Every ``log_every`` steps, with host-side metric values."""

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """After each evaluation, with ``eval_loss`` and ``perplexity``."""

    def on_train_end(self, status: str, result: TrainResult | None) -> None:
        """Once, with ``FINISHED``, ``FAILED`` (an exception) or ``KILLED`` (interrupted)."""


class CallbackList(Callback):
    """Calls each callback in turn, in the order given."""

    def __init__(self, callbacks: Sequence[Callback]):
        self.callbacks = list(callbacks)

    def on_train_start(self, run):
        for cb in self.callbacks:
            cb.on_train_start(run)

    def on_step(self, step, state):
        for cb in self.callbacks:
            cb.on_step(step, state)

    def on_log(self, step, metrics):
        for cb in self.callbacks:
            cb.on_log(step, metrics)

    def on_eval(self, step, metrics):
        for cb in self.callbacks:
            cb.on_eval(step, metrics)

    def on_train_end(self, status, result):
        for cb in self.callbacks:
            cb.on_train_end(status, result)
