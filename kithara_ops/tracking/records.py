"""One queued record of a run, written to MLflow: the kinds ``RunWriter`` queues and how each
is sent (``write_record``), apart from the thread, retries and spooling around it."""

from __future__ import annotations

from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from kithara_ops.samples import LENGTH_METRIC
from kithara_ops.tracking.logged_models import log_checkpoint, log_dataset

RECORD_NAMES = {
    "params": "params",
    "tags": "tags",
    "text": "text artifact",
    "artifacts": "artifacts",
    "table": "table rows",
    "metrics": "metric points",
    "checkpoint": "checkpoint records",
    "dataset": "dataset record",
    "end": "final status",
}
"""Each kind of record, as a warning names it."""


def write_record(
    client: MlflowClient,
    experiment_id: str,
    run_id: str,
    kind: str,
    payload: Any,
    logged_through: dict[str, int],
) -> None:
    """Send one record of ``kind`` (a key of ``RECORD_NAMES``) to run ``run_id``.

    Metric points at steps the run already holds (``logged_through``: the last step of each
    metric, logged before a crash and trained again after a resume) keep their first values:
    a history has one point per step.
    """
    if kind == "metrics":
        metrics = [
            Metric(k, v, ts, step) for k, v, ts, step in payload if step > logged_through.get(k, -1)
        ]
        if metrics:
            client.log_batch(run_id, metrics=metrics, synchronous=True)
    elif kind == "params":
        params = [Param(k, v) for k, v in payload.items()]
        client.log_batch(run_id, params=params, synchronous=True)
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in payload.items()], synchronous=True)
    elif kind == "text":
        client.log_text(run_id, payload["text"], payload["artifact_file"])
    elif kind == "table":
        # Rows of a step the run already logged (trained again after a resume) stay as first
        # logged, as metric points do: the step's summary metric says how far it got.
        if payload["step"] > logged_through.get(LENGTH_METRIC, -1):
            client.log_table(run_id, payload["columns"], payload["artifact_file"])
    elif kind == "artifacts":
        client.log_artifacts(run_id, payload["local_dir"], payload["artifact_path"])
    elif kind == "checkpoint":
        log_checkpoint(client, experiment_id, run_id, payload)
    elif kind == "dataset":
        log_dataset(client, run_id, payload)
    elif kind == "end":
        client.set_terminated(run_id, payload["status"])
