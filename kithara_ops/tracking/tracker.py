"""``MlflowTracker``: the Callback that turns a training run into an MLflow run."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import jax

from kithara_ops.callbacks import Callback, RunInfo, TrainResult
from kithara_ops.config import RunConfig
from kithara_ops.optim.describe import optimizer_params
from kithara_ops.tracking.params import run_params, run_tags, without_credentials
from kithara_ops.tracking.writer import Delivery, RunWriter

log = logging.getLogger("kithara_ops.tracking")

DEFAULT_EXPERIMENT = "kithara-ops"


def resolve_experiment(config: RunConfig) -> str:
    """``config.experiment``, else ``MLFLOW_EXPERIMENT_NAME``, else ``kithara-ops``."""
    return config.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


class MlflowTracker(Callback):
    """Logs a run to MLflow: optimizer identity, params, artifacts, metrics and status.

    Only process 0 of a multi-process run talks to MLflow. All writes go through a
    background ``RunWriter``, so a slow or absent server never holds up a step.

    Args:
      config: the run's config (tracking URI, experiment, run name, system metrics, model).
      flush_timeout: seconds to wait at the end for queued records before spooling them.
    """

    def __init__(self, config: RunConfig, flush_timeout: float = 60.0):
        self.config = config
        self.flush_timeout = flush_timeout
        self.writer: RunWriter | None = None
        self.delivery: Delivery | None = None
        self.description: dict | None = None
        self._model = None
        self._monitor = None
        self.experiment = resolve_experiment(config)
        self._last_logged: tuple[int, dict[str, float]] = (0, {})

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, once the run exists."""
        return self.writer.run_id if self.writer is not None else None

    def on_train_start(self, run: RunInfo) -> None:
        if jax.process_index() != 0:
            return
        from kithara_ops import __version__

        self.config = run.config
        self.description = run.description
        self._model = run.model
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
        self.writer.log_params(run_params(run, optimizer_params(self.description)))
        self.writer.log_text(json.dumps(self.description, indent=2), "optimizer/optimizer.json")
        logged = self.config.without_launch()
        logged = logged.replace(tracking_uri=without_credentials(logged.tracking_uri))
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
            self.writer.on_run_ready.append(
                lambda run_id: self._start_system_metrics(run_id, resume=True)
            )
            if record.mlflow_run_id:
                self._start_system_metrics(record.mlflow_run_id, resume=True)
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
        self._log(step, metrics)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._log(step, metrics)

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        if self.writer is None:
            return
        # NaN and infinities are logged as they are: MLflow keeps NaN, and a diverged run's
        # curve must show where it diverged rather than end at its last finite point.
        self.writer.log_metrics(step, metrics, int(time.time() * 1000))
        self._last_logged = (step, metrics)

    def on_train_end(self, status: str, result: TrainResult | None) -> None:
        if self.writer is None:
            return
        if status == "DIVERGED":
            step, metrics = self._last_logged
            seen = ", ".join(f"{k} {metrics[k]}" for k in ("loss", "grad_norm") if k in metrics)
            self.writer.set_tags({"kithara_ops.diverged_at_step": str(step),
                                  "kithara_ops.stop_reason": f"non-finite values: {seen}"})  # fmt: skip
            status = "FAILED"
        with tempfile.TemporaryDirectory() as tmp:
            if self.config.log_model and status == "FINISHED":
                self._queue_model(Path(tmp) / "model")
            self.delivery = self.writer.finish(status, self.flush_timeout)
        if self._monitor is not None:
            self._monitor.finish()
        if result is not None:
            result.run_id = self.run_id

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
