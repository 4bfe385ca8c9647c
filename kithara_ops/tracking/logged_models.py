"""Checkpoints as MLflow logged models, and the training data as a run input.

Each complete checkpoint becomes an MLflow 3 ``LoggedModel`` of type
``kithara-ops-checkpoint`` named ``step-N``, linked to its run, with the Orbax step folder
as a tag (nothing is uploaded: the weights stay where Orbax wrote them) and the run's latest
``loss``/``eval_loss``/``perplexity`` logged against it, so that the best checkpoint of an
experiment is one search::

    mlflow.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string="metrics.eval_loss < 10",
        order_by=[{"field_name": "metrics.eval_loss", "ascending": True}],
        max_results=1,
    )
"""

from __future__ import annotations

import json
import math
from typing import Any

CHECKPOINT_MODEL_TYPE = "kithara-ops-checkpoint"
"""The ``model_type`` of the logged models that stand for checkpoints."""

PATH_TAG = "kithara_ops.checkpoint_path"
"""The logged model's tag holding its checkpoint's folder."""

STEP_TAG = "kithara_ops.step"
"""The logged model's tag holding its checkpoint's step."""

LINKED_METRICS = ("loss", "eval_loss", "perplexity")
"""The run's metrics a checkpoint's logged model carries (their latest values)."""


def log_checkpoint(client: Any, experiment_id: str, run_id: str, payload: dict) -> str:
    """Record one checkpoint as a ready, external ``LoggedModel``; return its id.

    Args:
      payload: ``{"step", "path", "metrics"}`` as ``RunWriter.log_checkpoint`` queued it;
        ``metrics`` maps a key to the run's point ``(value, timestamp_ms, step)`` it holds.
    """
    from mlflow.entities import LoggedModelStatus, Metric
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL

    step = int(payload["step"])
    model = client.create_logged_model(
        experiment_id,
        name=f"step-{step}",
        source_run_id=run_id,
        tags={MLFLOW_MODEL_IS_EXTERNAL: "true", PATH_TAG: payload["path"], STEP_TAG: str(step)},
        model_type=CHECKPOINT_MODEL_TYPE,
    )
    # The run's own points, sent again with the model's id: MLflow stores a point it already
    # holds once (same key, value, timestamp and step), so the run's curves stay as they were.
    metrics = [
        Metric(key, float(value), int(timestamp), int(at), model_id=model.model_id)
        for key, (value, timestamp, at) in payload["metrics"].items()
        if math.isfinite(value)
    ]
    if metrics:
        client.log_batch(run_id, metrics=metrics, synchronous=True)
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id


def log_dataset(client: Any, run_id: str, summary: dict) -> None:
    """Record the training data as the run's input (``mlflow.log_input``'s record).

    Args:
      summary: ``{"name", "source", "digest", "profile"}``, e.g. ``Dataset.summary()``.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = Dataset(
        name=summary["name"],
        digest=summary["digest"],
        source_type="local",
        source=json.dumps({"uri": summary["source"]}),
        profile=json.dumps(summary.get("profile", {})),
    )
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, "training")]
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags)])
