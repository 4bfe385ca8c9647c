"""``MlflowTracker``: the Callback that turns a training run into an MLflow run."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import jax

from kithara_ops.callbacks import Callback, RunInfo, TrainResult
from kithara_ops.config import RunConfig
from kithara_ops.config.credentials import masked
from kithara_ops.interrupt import CancelOnSignal, TrainingStopped
from kithara_ops.optim.describe import optimizer_params
from kithara_ops.samples import SAMPLES_FILE, summary
from kithara_ops.stopping import PRUNED, Bests
from kithara_ops.tracking.experiments import DEFAULT_EXPERIMENT
from kithara_ops.tracking.logged_models import LINKED_METRICS
from kithara_ops.tracking.params import (
    DIVERGED_TAG,
    MAX_PARAM_LENGTH,
    STOP_REASON_TAG,
    chat_template_text,
    run_params,
    run_tags,
)
from kithara_ops.tracking.writer import Delivery, RunWriter

log = logging.getLogger("kithara_ops.tracking")

FLUSH_TIMEOUT_ENV = "KITHARA_OPS_MLFLOW_FLUSH_TIMEOUT"
"""The environment variable that sets ``MlflowTracker``'s default ``flush_timeout`` (seconds)."""

DEFAULT_FLUSH_TIMEOUT = 60.0

# After this many seconds of waiting at the end, the user is told what the wait is for: a
# healthy store takes the last records well within it, and longer silence reads as a hang.
_SAY_WAITING_AFTER = 2.0


def default_flush_timeout() -> float:
    """``KITHARA_OPS_MLFLOW_FLUSH_TIMEOUT`` when it is a number of seconds >= 0, else 60."""
    value = os.environ.get(FLUSH_TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_FLUSH_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds >= 0 and math.isfinite(seconds):
        return seconds
    log.warning(
        "%s=%r is not a number of seconds; the default %.0f s is used.",
        FLUSH_TIMEOUT_ENV,
        value,
        DEFAULT_FLUSH_TIMEOUT,
    )
    return DEFAULT_FLUSH_TIMEOUT


def resolve_experiment(config: RunConfig) -> str:
    """``config.experiment``, else ``MLFLOW_EXPERIMENT_NAME``, else ``kithara-ops``."""
    return config.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


class MlflowTracker(Callback):
    """Logs a run to MLflow: optimizer identity, params, artifacts, metrics and status.

    Only process 0 of a multi-process run talks to MLflow. All writes go through a
    background ``RunWriter``, so a slow or absent server never holds up a step.

    At the end (after the checkpointer has saved the final step) it waits at most
    ``flush_timeout`` seconds in all for the writer and the system-metrics monitor, then
    spools what is left. A SIGTERM or Ctrl-C during that wait ends it at once; what is queued
    is spooled, and a run that had finished raises ``TrainingStopped`` for that signal.

    Args:
      config: the run's config (tracking URI, experiment, run name, system metrics, model).
      flush_timeout: seconds to wait at the end for queued records before spooling them;
        default ``$KITHARA_OPS_MLFLOW_FLUSH_TIMEOUT``, else 60.
    """

    def __init__(self, config: RunConfig, flush_timeout: float | None = None):
        self.config = config
        self.flush_timeout = default_flush_timeout() if flush_timeout is None else flush_timeout
        self.writer: RunWriter | None = None
        self.delivery: Delivery | None = None
        self.description: dict | None = None
        self._model = None
        self._monitor = None
        self._ending = False
        self.experiment = resolve_experiment(config)
        self._last_logged: tuple[int, dict[str, float]] = (0, {})
        self._bests, self._stopped_before = Bests(), False
        # The linked metrics' last points, (value, timestamp, step) by key, as of each step.
        self._latest: dict[str, tuple[float, int, int]] = {}
        self._snapshots: list[tuple[int, dict[str, tuple[float, int, int]]]] = []

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, once the run exists."""
        return self.writer.run_id if self.writer is not None else None

    def on_train_start(self, run: RunInfo) -> None:
        if jax.process_index() != 0:
            return
        from kithara_ops.version import __version__

        self.config = run.config
        self.description = run.description
        self._model = run.model
        resumed = run.resumed_from
        self._bests = Bests.from_json(resumed and resumed.bests, self.config.target_eval_loss)
        self._stopped_before = resumed is not None and resumed.stop_reason is not None
        if run.resumed_from is not None:
            self._continue(run)
            return
        self.writer = RunWriter(
            self.config.tracking_uri,
            self.experiment,
            run_name=self.config.run_name or self.description["label"],
            parent_run_id=self.config.parent_run_id,
            run_uid=run.run_uid,
        )
        if self.config.system_metrics:
            self.writer.on_run_ready.append(self._start_system_metrics)
        self.writer.set_tags(run_tags(run, self.description, __version__))
        self.writer.log_params(
            run_params(run, optimizer_params(self.description, MAX_PARAM_LENGTH))
        )
        self.writer.log_text(json.dumps(self.description, indent=2), "optimizer/optimizer.json")
        if run.data is not None:
            self.writer.log_dataset(run.data)
        template = chat_template_text(self.config)
        if template is not None:
            self.writer.log_text(template, "chat_template/chat_template.jinja")
        logged = self.config.without_launch()
        logged = logged.replace(tracking_uri=masked(logged.tracking_uri))
        self.writer.log_text(logged.dump_yaml(), "config/run.yaml")

    def _continue(self, run: RunInfo) -> None:
        """Reattach to the resumed run: no params (MLflow refuses changes), a tag per resume.

        The run is the one the checkpoint's record names (release 0.1.0 recorded its MLflow
        id) or the experiment's run tagged with the record's ``run_uid``; a run that was never
        created (MLflow was down all along) is created now.
        """
        record, from_step = run.resumed_from, run.start_step
        self.writer = RunWriter(
            self.config.tracking_uri,
            self.experiment,
            run_name=self.config.run_name or self.description["label"],
            run_id=record.mlflow_run_id,
            parent_run_id=self.config.parent_run_id,
            run_uid=run.run_uid,
            find_existing=True,
        )
        if self.config.system_metrics:
            # Started by the writer once it has reattached: the monitor reads the run when it
            # starts, and that must not hold up the first step when the server is slow.
            self.writer.on_run_ready.append(
                lambda run_id: self._start_system_metrics(run_id, resume=True)
            )
        tags = {"kithara_ops.resumed_from_step": str(from_step)}
        if run.optimizer_change is not None:
            # The optimizer params keep the first optimizer; the change is told here.
            tags[f"kithara_ops.optimizer_{run.optimizer_change}_at_step"] = str(from_step)
            tags["optimizer.label"] = self.description["label"]
            self.writer.log_text(
                json.dumps(self.description, indent=2),
                f"optimizer/optimizer-from-step-{from_step}.json",
            )
        self.writer.set_tags(tags)

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        self._bests.saw_loss(step, metrics.get("loss"))
        self._log(step, {**metrics, **self._bests.metrics()})

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        config = self.config
        self._bests.saw_eval(
            step, metrics["eval_loss"], config.early_stop_min_delta, config.target_eval_loss
        )
        self._log(step, {**metrics, **self._bests.metrics()})

    def on_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """The rows go to the run's ``samples.json`` table, their summary to its metrics."""
        if self.writer is None:
            return
        columns = {key: [row[key] for row in rows] for key in rows[0]} if rows else {}
        self.writer.log_table(columns, SAMPLES_FILE, step)
        self.writer.log_metrics(step, summary(rows), int(time.time() * 1000))

    def on_checkpoint(self, step: int, path: str) -> None:
        if self.writer is None:
            return
        # A save is announced once written, steps later: the values logged last at or
        # before its step are the ones it holds.
        held = [values for at, values in self._snapshots if at <= step]
        self._snapshots = [(at, values) for at, values in self._snapshots if at >= step]
        self.writer.log_checkpoint(step, path, held[-1] if held else {})

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        if self.writer is None:
            return
        timestamp = int(time.time() * 1000)
        linked = {k: (v, timestamp, step) for k, v in metrics.items() if k in LINKED_METRICS}
        if linked:
            self._latest.update(linked)
            self._snapshots.append((step, dict(self._latest)))
        # NaN and infinities are logged as they are: MLflow keeps NaN, and a diverged run's
        # curve must show where it diverged rather than end at its last finite point.
        self.writer.log_metrics(step, metrics, timestamp)
        self._last_logged = (step, metrics)

    def failure(self) -> Exception | None:
        # A store that is full or read-only stays so: rather than train on untracked for
        # hours, the run stops (its state checkpointed) until the store is fixed.
        writer = self.writer
        if writer is None or not writer.store_fault:
            return None
        where = masked(writer.tracking_uri)
        return RuntimeError(f"the MLflow store at {where} cannot be written ({writer.refused})")

    def on_artifacts(self, local_dir: str, artifact_path: str) -> None:
        if self.writer is not None and not self._ending:
            self.writer.log_artifacts(local_dir, artifact_path)

    def on_hang(self, step: int, seconds: float) -> None:
        """Mark the run FAILED, ``stop_reason=hang`` and the last step, within 10 s."""
        if self.writer is None or self._ending:
            return
        self._ending = True
        self.writer.set_tags({STOP_REASON_TAG: "hang", "kithara_ops.hang_step": str(step)})
        self.delivery = self.writer.finish("FAILED", timeout=10.0)

    def on_train_end(self, status: str, result: TrainResult | None) -> None:
        if self.writer is None:
            return
        self._ending = True
        if status == "DIVERGED":
            step, metrics = self._last_logged
            seen = ", ".join(f"{k} {metrics[k]}" for k in ("loss", "grad_norm") if k in metrics)
            self.writer.set_tags({DIVERGED_TAG: str(step),
                                  STOP_REASON_TAG: f"non-finite values: {seen}"})  # fmt: skip
            status = "FAILED"
        if result is not None and (result.stop_reason or self._stopped_before):
            # A run resumed after an early stop that now reached its end says so.
            self.writer.set_tags({STOP_REASON_TAG: result.stop_reason or "completed"})
        if result is not None and result.stop_reason == PRUNED:
            # Optuna's pruned trials are not successes: the run says so, and where.
            self.writer.log_params({"pruned_at_step": str(result.step)})
            status = "KILLED"
        deadline = time.monotonic() + self.flush_timeout
        with CancelOnSignal() as stop, tempfile.TemporaryDirectory() as tmp:
            monitor = self._stop_monitor()
            if self.config.log_model and status == "FINISHED":
                self._queue_model(Path(tmp) / "model")
            notice = threading.Timer(_SAY_WAITING_AFTER, self._say_waiting, (deadline, stop.active))
            notice.daemon = True
            notice.start()
            try:
                left = max(deadline - time.monotonic(), 0.0)
                self.delivery = self.writer.finish(status, left, stop.event)
                while monitor is not None and monitor.is_alive() and not stop.event.is_set():
                    if (left := deadline - time.monotonic()) <= 0:
                        break  # abandoned: a daemon thread, it cannot keep the process alive
                    monitor.join(min(left, 0.05))
            finally:
                notice.cancel()
        if result is not None:
            result.run_id = self.run_id
        if stop.signum is not None and status == "FINISHED":
            # The run had finished and its final checkpoint is saved (the checkpointer ends
            # first); the signal still says the process was told to stop, and its exit code
            # must say so. A failed or stopped run's own error is already on its way out.
            raise TrainingStopped(stop.signum, result.step if result is not None else 0)

    def _say_waiting(self, deadline: float, interruptible: bool) -> None:
        log.warning(
            "Waiting up to %.0f s more for MLflow at %s to take the run's last records%s.",
            max(deadline - time.monotonic(), 0.0),
            masked(self.writer.tracking_uri),
            " (SIGTERM or Ctrl-C stops waiting and saves them to a spool file)"
            if interruptible
            else "",
        )

    def _stop_monitor(self) -> threading.Thread | None:
        """Stop the system-metrics monitor on a thread of its own, returned to wait on."""
        monitor, self._monitor = self._monitor, None
        if monitor is None:
            return None
        # MLflow's monitor sends its last samples with a client of its own, which retries for
        # minutes against a dead server: the end of the run waits for it only until its deadline.
        thread = threading.Thread(target=monitor.finish, name="mlflow-system-metrics", daemon=True)
        thread.start()
        return thread

    def _queue_model(self, path: Path) -> None:
        """Save the trained model in MLflow's Keras format and queue it as ``model/``."""
        import mlflow.keras

        try:
            mlflow.keras.save_model(self._model, str(path))
        except Exception as err:  # a model Keras cannot serialise must not fail the run
            log.warning("The model could not be saved for MLflow (%s); it was not logged.", err)
            return
        self.writer.log_artifacts(str(path), "model")

    def _start_system_metrics(self, run_id: str, resume: bool = False) -> None:
        if self._ending:  # the run is over; a monitor started now would never be stopped
            return
        try:
            from mlflow.environment_variables import MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            interval = MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.get() or 10
            self._monitor = SystemMetricsMonitor(
                run_id,
                sampling_interval=interval,
                resume_logging=resume,
                tracking_uri=self.writer.tracking_uri,
            )
            self._monitor.start()
        except Exception as err:
            log.warning("MLflow system metrics are off: %s", err)
