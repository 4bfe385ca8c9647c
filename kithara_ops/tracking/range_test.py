"""A learning-rate range test as an MLflow run: the curve, the chart, the suggestion."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

RANGE_TEST_TAG = "kithara_ops.lr_find"
CHART_ARTIFACT = "lr_find.png"


def range_test_figure(test: Any) -> Any:
    """Loss and smoothed loss against the learning rate (log axis), the suggestion marked."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    axes.plot(test.learning_rates, test.losses, color="0.7", linewidth=1, label="loss")
    axes.plot(test.learning_rates, test.smoothed, linewidth=2, label="smoothed loss")
    axes.axvline(test.suggested_learning_rate, color="tab:red", linestyle="--",
                 label=f"suggested {test.suggested_learning_rate:.3g}")  # fmt: skip
    axes.set_xscale("log")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss")
    axes.set_title(f"learning-rate range test: {test.spec[:70]}", fontsize=9)
    axes.legend()
    figure.tight_layout()
    return figure


def log_range_test(client: Any, experiment_id: str, config: Any, test: Any, params: dict) -> str:
    """Log ``test`` as a finished run of ``experiment_id``: ``params``, per step the
    metrics ``lr_find.learning_rate``, ``lr_find.loss`` and ``lr_find.smoothed_loss``, then
    ``suggested_learning_rate``, ``min_loss_learning_rate`` and the chart; returns its id."""
    from mlflow.entities import Metric, Param

    from kithara_ops.optim.describe import optimizer_label
    from kithara_ops.optim.spec import build_optimizer
    from kithara_ops.tracking.compare import save_png
    from kithara_ops.tracking.params import MAX_PARAM_LENGTH, shorten

    label = optimizer_label(build_optimizer(config.optimizer, config.learning_rate,
                                            config.weight_decay)).split(" ", 1)[0]  # fmt: skip
    run = client.create_run(experiment_id, run_name=f"lr-find {label}",
                            tags={RANGE_TEST_TAG: "true", "optimizer.label": label})  # fmt: skip
    run_id, now = run.info.run_id, int(time.time() * 1000)
    client.log_batch(run_id, params=[Param(k, shorten(str(v), MAX_PARAM_LENGTH))
                                     for k, v in params.items()])  # fmt: skip
    metrics = []
    for step, (lr, loss, smooth) in enumerate(zip(test.learning_rates, test.losses, test.smoothed)):
        metrics += [Metric("lr_find.learning_rate", lr, now, step),
                    Metric("lr_find.loss", loss, now, step),
                    Metric("lr_find.smoothed_loss", smooth, now, step)]  # fmt: skip
    metrics += [Metric("suggested_learning_rate", test.suggested_learning_rate, now, 0),
                Metric("min_loss_learning_rate", test.min_loss_learning_rate, now, 0)]  # fmt: skip
    for i in range(0, len(metrics), 900):
        client.log_batch(run_id, metrics=metrics[i : i + 900])
    with tempfile.TemporaryDirectory() as tmp:
        chart = save_png(range_test_figure(test), Path(tmp) / CHART_ARTIFACT)
        client.log_artifact(run_id, str(chart))
    client.set_terminated(run_id, "FINISHED")
    return run_id
