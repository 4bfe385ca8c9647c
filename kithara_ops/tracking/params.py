"""What a run logs as MLflow params and tags, as plain strings within MLflow's limits.

The keys are the same for every run, whatever the optimizer family, so that the MLflow runs
table lines runs up column by column. MLflow's limits on values and on batch requests are
defined here once, for everything in kithara-ops that logs.
"""

from __future__ import annotations

from typing import Any

import jax

from kithara_ops.callbacks import RunInfo
from kithara_ops.tracking.experiments import EXPERIMENT_TAGS  # noqa: F401 (still importable from here)


def _mlflow_limit(name: str, fallback: int) -> int:
    """MLflow's own value of the limit ``mlflow.utils.validation.<name>``, so that a release
    that changes it is followed; ``fallback`` if the installed MLflow does not define it."""
    try:
        from mlflow.utils import validation
    except ImportError:  # not part of MLflow's documented API: it may move
        return fallback
    value = getattr(validation, name, None)
    return value if isinstance(value, int) and value > 0 else fallback


# The fallbacks are the values of MLflow 2.x and 3.x.
MAX_PARAM_LENGTH = _mlflow_limit("MAX_PARAM_VAL_LENGTH", 6000)
"""MLflow's limit on a param value, in characters (``MAX_PARAM_VAL_LENGTH``)."""
MAX_TAG_LENGTH = _mlflow_limit("MAX_TAG_VAL_LENGTH", 8000)
"""MLflow's limit on a tag value, in characters (``MAX_TAG_VAL_LENGTH``)."""
MAX_METRICS_PER_BATCH = _mlflow_limit("MAX_METRICS_PER_BATCH", 1000)
"""The most metric points one ``log_batch`` request may carry."""
MAX_PARAMS_PER_BATCH = _mlflow_limit("MAX_PARAMS_TAGS_PER_BATCH", 100)
"""The most params (and tags, counted together) one ``log_batch`` request may carry."""
DIVERGED_TAG = "kithara_ops.diverged_at_step"
"""The tag a run stopped for non-finite values carries: the step it was noticed at."""
STOP_REASON_TAG = "kithara_ops.stop_reason"
"""Why a run ended before its last step: ``early_stop``, ``target_eval_loss``, or the
non-finite values that stopped it."""


def shorten(value: Any, limit: int) -> str:
    """``str(value)``, cut to ``limit`` characters with a trailing ``...`` when longer."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def config_params(run: RunInfo) -> dict[str, str]:
    """The run's configuration as params, plus what the Trainer resolved (mesh, size).

    Tracking settings are left out: where a run is logged is not part of what it is. So are
    the coordinator address and the process rank, which differ between launches and
    processes (``num_processes`` stays). The LoRA options are logged as ``lora.rank``,
    ``lora.targets`` and ``lora.alpha`` (see ``lora_params``); a chat template file's
    SHA-256 (16 hex digits) as ``chat_template.digest``.
    """
    skip = {"tracking", "tracking_uri", "experiment", "run_name", "system_metrics", "log_model",
            "parent_run_id", "coordinator", "process_id", "lora_rank", "lora_targets",
            "lora_alpha", "quantize"}  # fmt: skip
    values = {k: v for k, v in run.config.to_dict().items() if k not in skip}
    values["mesh_shape"] = ",".join(f"{axis}={size}" for axis, size in run.mesh_shape.items())
    values["num_params"] = run.num_params
    values["num_trainable_params"] = run.num_trainable_params
    values.update(lora_params(run))
    # What precision left the optimizer's state in: a property of the run, not of the
    # optimizer's description (describe prints every optimizer.* param a run logs).
    if run.state_dtypes:
        values["optimizer_state_dtype"] = run.state_dtypes["optimizer_state"]
    template = chat_template_text(run.config)
    if template is not None:
        from kithara_ops.export_files import template_digest

        values["chat_template.digest"] = template_digest(template)
    values["total_steps"] = run.total_steps
    # Every run has a group, so the MLflow UI can gather runs by it (seeds of one optimizer).
    values["group"] = run.config.group or run.description["label"]
    return {key: shorten(value, MAX_PARAM_LENGTH) for key, value in values.items()}


def chat_template_text(config: Any) -> str | None:
    """The text of the run's ``chat_template`` file, ``None`` without one (or unreadable:
    the run read it already, so a file gone since only costs the record)."""
    if not config.chat_template:
        return None
    from kithara_ops.data.chat import read_template_file

    try:
        return read_template_file(config.chat_template)
    except Exception:
        return None


def lora_params(run: RunInfo) -> dict[str, Any]:
    """``lora.rank``, ``lora.targets`` and ``lora.alpha`` (``None`` without LoRA; alpha is
    the rank when not given), and ``model`` as the handle.

    A model loaded from a preset reports what was really applied to it (the layer names
    KerasHub's defaults gave, too); another model reports the config's values.
    """
    base = run.base_model or {}
    values = {
        "lora.rank": base.get("lora_rank", run.config.lora_rank),
        "lora.targets": base.get("lora_targets", run.config.lora_targets),
        "lora.alpha": base.get("lora_alpha", run.config.lora_alpha),
        "lora.quantize": base.get("quantize") or run.config.quantize,
    }
    if values["lora.rank"] is not None and values["lora.alpha"] is None:
        values["lora.alpha"] = float(values["lora.rank"])
    if base.get("handle"):
        values["model"] = base["handle"]
    return values


def run_params(run: RunInfo, optimizer_params: dict[str, str]) -> dict[str, str]:
    """All params of a run: the optimizer's (``optimizer.*``) and the config's.

    ``optimizer.spec`` is the spec the optimizer was built from, when it was built from one:
    pasted into ``--optimizer`` it repeats the run.
    """
    params = {k: shorten(v, MAX_PARAM_LENGTH) for k, v in optimizer_params.items()}
    params.update(config_params(run))
    params.pop("optimizer", None)
    if "optimizer" not in run.given:
        params["optimizer.spec"] = shorten(run.config.optimizer, MAX_PARAM_LENGTH)
    return params


def run_tags(run: RunInfo, description: dict[str, Any], version: str) -> dict[str, str]:
    """Tags for filtering and for telling runs apart in the UI's tables and legends."""
    tags = {
        "kithara_ops.version": version,
        "optimizer.family": description["family"],
        "optimizer.label": description["label"],
        "optimizer.name": description["name"],
        "jax.backend": jax.default_backend(),
        "jax.device_count": str(jax.device_count()),
        "jax.process_count": str(jax.process_count()),
    }
    return {k: shorten(v, MAX_TAG_LENGTH) for k, v in tags.items()}
