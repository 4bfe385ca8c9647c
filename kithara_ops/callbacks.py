"""The narrow interface through which the Trainer reports to everything else.

Trackers, checkpointers and progress displays subclass ``Callback`` and override the events
they care about. The Trainer calls them in order; each reads only the event it is handed
(never the Trainer, never another callback), so any of them can be left out or replaced.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras

    from kithara_ops.checkpoint.record import RunRecord
    from kithara_ops.config import RunConfig
    from kithara_ops.state import TrainState


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What a callback may know about a run when it starts.

    Attributes:
      config: the run's configuration.
      model: the Keras model being trained.
      optimizer: the optimizer object as the user passed it.
      description: ``describe_optimizer(optimizer)``: family, name, hyperparameters, label.
      num_params: number of the model's weights, trainable or frozen (RNG seed states are
        not weights).
      mesh_shape: ``{"data": n, "fsdp": m}``.
      start_step: the step training starts from (0, or the restored step).
      total_steps: the step training stops at.
      run_uid: the run's own identity, the same in every process and across resumes; the
        tracker tags its MLflow run with it and checkpoints record it.
      key_groups: the state's variable keys by group (``params``, ``non_trainable``, and
        ``opt`` for a Keras optimizer), in the model's order.
      resumed_from: the record of the checkpoint the run continues from, or ``None``.
      data: the training data's ``summary()`` (name, source, digest, profile), when the
        data gives one.
      optimizer_change: with ``resumed_from``, ``"reset"`` or ``"migrated"`` when the
        optimizer state did not come from the checkpoint as it was saved.
      num_trainable_params: number of trainable parameters (the adapters alone with LoRA).
      base_model: for a model loaded from a preset, ``models.hub.base_model_of(model)``:
        its handle, fingerprint and LoRA settings; else ``None``.
      state_bytes: the placed state's size: ``total`` (every array once) and
        ``per_device`` (the most any one device holds, replicated arrays counted on each).
      given: the config fields that hold the label of a Python object the run was given
        (``config.OBJECT_FIELDS``), not a spec.
      state_dtypes: the floating dtypes of the state's ``params`` and ``optimizer_state``,
        e.g. ``{"params": "bfloat16", "optimizer_state": "bfloat16"}``.
      lower_train_step: after the first step, returns the train step lowered on that step's
        argument shapes (``jax.stages.Lowered``).
    """

    config: RunConfig
    model: keras.Model | None
    optimizer: Any
    description: dict[str, Any]
    num_params: int
    mesh_shape: dict[str, int]
    start_step: int
    total_steps: int
    run_uid: str = ""
    key_groups: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    resumed_from: RunRecord | None = None
    optimizer_change: str | None = None
    data: dict[str, Any] | None = None
    num_trainable_params: int = 0
    base_model: dict[str, Any] | None = None
    state_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    given: frozenset[str] = frozenset()
    state_dtypes: dict[str, str] = dataclasses.field(default_factory=dict)
    lower_train_step: Any = None


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """One trained step, as the Trainer hands it to callbacks.

    Attributes:
      step: the number of optimizer steps taken, counting this one.
      state: the train state after the step, still on the devices: fetching it every step
        would stall the loop.
      data_position: the training iterator's own position after this step's batch (its
        ``get_state()``), or ``None`` when it has none; the number of batches consumed is
        ``step`` itself.
      seconds: wall time since ``train()`` started.
      stopping: ``True`` when this is the last step of a run stopped by a signal, by a
        sink's ``failure()`` or early (``stop_reason``).
      stop_reason: ``early_stop``, ``target_eval_loss`` or ``pruned`` when the run ends
        after this step (``stopping.stop_reason``, ``Callback.stop_request``), else ``None``.
    """

    step: int
    state: TrainState
    data_position: Any = None
    seconds: float = 0.0
    stopping: bool = False
    stop_reason: str | None = None


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
      run_id: the MLflow run id, when the run was tracked (set by the tracker at the end).
      state_bytes: ``RunInfo.state_bytes``: the state's total size and the most one device
        holds.
      stop_reason: ``early_stop``, ``target_eval_loss`` or ``pruned`` for a run that ended
        before its last step (``early_stop_patience``, ``target_eval_loss``, a search's
        pruner); else ``None``.
    """

    step: int
    loss: float | None
    eval_loss: float | None
    seconds: float
    compile_seconds: float = 0.0
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    run_id: str | None = None
    state_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    given: frozenset[str] = frozenset()
    stop_reason: str | None = None


class Callback:
    """Base class: every event is a no-op until overridden."""

    def on_train_start(self, run: RunInfo) -> None:
        """Before the first step."""

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """Every ``log_every`` steps (and at the last), with host-side metric values."""

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """After each evaluation, with ``eval_loss`` and ``perplexity``."""

    def on_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """After the eval prompts were completed at ``step``: one row per prompt
        (``samples.Samples``: prompt, completion, reference, scores)."""

    def on_step(self, record: StepRecord) -> None:
        """After every step, once its metrics and evaluation (if due) were reported."""

    def on_checkpoint(self, step: int, path: str) -> None:
        """Once the checkpoint of ``step`` is completely written, in folder ``path``."""

    def failure(self) -> Exception | None:
        """Why the run cannot go on, or ``None`` while all is well.

        Asked after every step, once the step's metrics were reported: an error returned
        here (a store this sink writes to is full, say) ends the run after that step, which
        is reported as the last one (``StepRecord.stopping``) so that it is checkpointed.
        """
        return None

    def stop_request(self) -> str | None:
        """Why the run should end early, as a ``stop_reason``, or ``None`` to go on.

        Asked after each evaluation, once it was reported: a reason returned here (a search's
        pruner judging the trial hopeless, say) ends the run at that step like early
        stopping does (``TrainResult.stop_reason``).
        """
        return None

    def on_artifacts(self, local_dir: str, artifact_path: str) -> None:
        """Files another sink wrote for the run's record (a profiler trace), in ``local_dir``,
        to be kept under ``artifact_path``; the folder stays until the run has ended."""

    def on_hang(self, step: int, seconds: float) -> None:
        """The run made no progress for ``seconds`` after ``step`` and is about to end the
        process (``watchdog.Watchdog``, from its own thread, while the loop is stuck): record
        what can be recorded quickly; the state is not saved (it may be mid-update)."""

    def on_train_end(self, status: str, result: TrainResult | None) -> None:
        """Once, with ``FINISHED``, ``FAILED`` (an exception) or ``KILLED`` (interrupted).

        A callback that produced something the caller needs (the MLflow run id) may add it
        to ``result``.
        """


class CallbackList(Callback):
    """Calls each callback in turn, in the order given."""

    def __init__(self, callbacks: Sequence[Callback]):
        self.callbacks = list(callbacks)

    def on_train_start(self, run):
        for cb in self.callbacks:
            cb.on_train_start(run)

    def on_log(self, step, metrics):
        for cb in self.callbacks:
            cb.on_log(step, metrics)

    def on_eval(self, step, metrics):
        for cb in self.callbacks:
            cb.on_eval(step, metrics)

    def on_samples(self, step, rows):
        for cb in self.callbacks:
            cb.on_samples(step, rows)

    def on_step(self, record):
        for cb in self.callbacks:
            cb.on_step(record)

    def on_checkpoint(self, step, path):
        for cb in self.callbacks:
            cb.on_checkpoint(step, path)

    def failure(self):
        return next((err for cb in self.callbacks if (err := cb.failure()) is not None), None)

    def stop_request(self):
        return next((why for cb in self.callbacks if (why := cb.stop_request())), None)

    def on_artifacts(self, local_dir, artifact_path):
        for cb in self.callbacks:
            cb.on_artifacts(local_dir, artifact_path)

    def on_hang(self, step, seconds):
        for cb in self.callbacks:  # the process ends anyway: each sink gets its chance
            with contextlib.suppress(Exception):
                cb.on_hang(step, seconds)

    def on_train_end(self, status, result):
        # Every sink ends, even after one failed (a signal that cut the MLflow flush short
        # must not leave the progress bar running); the first failure is raised after.
        failure = None
        for cb in self.callbacks:
            try:
                cb.on_train_end(status, result)
            except BaseException as err:
                failure = failure or err
        if failure is not None:
            raise failure
