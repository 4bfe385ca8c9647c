"""Compare the runs of one MLflow experiment: a summary per run, a table and a chart.

Each training run logs its optimizer as tags and params and its metrics by global step. This
module reads them back with an explicit ``MlflowClient`` (never MLflow's fluent global run
state) and turns them into :class:`RunSummary` objects, a ``rich`` table and a PNG line chart
with one line per run.
"""

from __future__ import annotations

import collections
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kithara_ops.config.credentials import masked, take_credentials
from kithara_ops.errors import ConfigError
from kithara_ops.tracking.experiments import experiment_state
from kithara_ops.tracking.params import DIVERGED_TAG

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

PARENT_TAG = "mlflow.parentRunId"
LABEL_TAG = "optimizer.label"
HIGHER_IS_BETTER = frozenset({"tokens_per_second"})
"""Metrics whose best value is the maximum; for every other metric it is the minimum."""

BUDGETS = ("steps", "tokens", "seconds", "flops")
"""Axes a budget is counted on: optimizer steps, tokens trained on, wall seconds, FLOPs."""
SERIES = ("history", "seconds")
"""``RunSummary`` fields that hold one value per logged point, left out of JSON and CSV."""
_PAGE = 1000
_MAX_NAMES = 5


@dataclass
class RunSummary:
    """One run's optimizer and how it did on the compared metric.

    Attributes:
        run_id: The MLflow run ID.
        run_name: The MLflow run name.
        label: The ``optimizer.label`` tag, or the run name when the tag is missing.
        status: The MLflow run status, e.g. ``FINISHED`` or ``RUNNING``; ``DIVERGED@N`` for a
            run stopped at step N because its loss or gradients stopped being finite.
        optimizer: The ``optimizer.name`` param, e.g. ``adamw``.
        learning_rate: The ``optimizer.learning_rate`` param (a number or a schedule's text).
        steps: The last step at which the metric was logged.
        final: The metric's last value.
        best: The metric's minimum (maximum for metrics in ``HIGHER_IS_BETTER``), NaN ignored.
        tokens_per_second: The median of the logged ``tokens_per_second`` points (the first
            steps compile and a last sample is one moment; the median is the run's pace).
        flops_per_second: The last logged ``flops_per_second`` (achieved FLOP/s).
        mfu: The last logged ``mfu``, where the devices' peak is known.
        compile_seconds: The step's compile time, as logged.
        group: What the run repeats, by which ``compare --group`` gathers runs: the ``group``
            param (or the param or tag ``group_by`` names), else the optimizer's label.
        seed: The ``seed`` param, which pairs runs of different groups.
        tokens_per_step: ``batch_size * seq_len`` from the params: tokens one step trains on.
        flops_per_step: The logged ``flops_per_step``, where the run logged it.
        history: ``(step, value)`` pairs sorted by step; when a step was logged more than
            once (a resumed run), the value logged last is kept.
        seconds: For each point of ``history``, wall seconds from the run's start to when
            it was logged.
    """

    run_id: str
    run_name: str
    label: str
    status: str
    optimizer: str | None = None
    learning_rate: str | None = None
    steps: int | None = None
    final: float | None = None
    best: float | None = None
    tokens_per_second: float | None = None
    flops_per_second: float | None = None
    mfu: float | None = None
    compile_seconds: float | None = None
    group: str | None = None
    seed: int | None = None
    tokens_per_step: int | None = None
    flops_per_step: float | None = None
    history: list[tuple[int, float]] = field(default_factory=list, repr=False)
    seconds: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Return the summary without its series, with non-finite numbers as ``None``."""
        data = asdict(self)
        for series in SERIES:
            del data[series]
        for key, value in data.items():
            if isinstance(value, float) and not math.isfinite(value):
                data[key] = None
        return data


def compare_runs(
    experiment: str,
    *,
    tracking_uri: str | None = None,
    metric: str = "loss",
    parent_run_id: str | None = None,
    group_by: str = "group",
) -> list[RunSummary]:
    """Summarise the runs of an experiment on one metric, best first.

    Parent runs (runs that another run names in its ``mlflow.parentRunId`` tag) are left
    out. Runs that never logged ``metric`` are kept, with ``None`` for its values, last.

    Args:
        experiment: The experiment's name.
        tracking_uri: The tracking server or store; ``None`` resolves it as MLflow does
            (``MLFLOW_TRACKING_URI``, then MLflow's default).
        metric: The metric to compare, e.g. ``loss``, ``eval_loss`` or ``tokens_per_second``.
        parent_run_id: Only include the children of this run.
        group_by: The param (or tag) whose value is each summary's ``group``.

    Returns:
        One summary per run, sorted by the final value: ascending, or descending for a
        metric in ``HIGHER_IS_BETTER``; runs without the metric last.

    Raises:
        ConfigError: The experiment does not exist, or ``parent_run_id`` is not a run of it.
    """
    from mlflow.tracking import MlflowClient

    tracking_uri = take_credentials(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment_id = _experiment_id(client, experiment, tracking_uri)
    runs = _all_runs(client, experiment_id)
    parents = {run.data.tags[PARENT_TAG] for run in runs if PARENT_TAG in run.data.tags}
    if parent_run_id is not None:
        _check_parent(client, parent_run_id, experiment_id, experiment)
        runs = [run for run in runs if run.data.tags.get(PARENT_TAG) == parent_run_id]
    summaries = [
        _summary(client, run, metric, group_by) for run in runs if run.info.run_id not in parents
    ]
    sign = -1.0 if metric in HIGHER_IS_BETTER else 1.0

    def order(summary: RunSummary) -> tuple[bool, float]:
        # Diverged runs and runs without the metric go last, whatever their last finite value.
        missing = summary.final is None or not math.isfinite(summary.final)
        missing = missing or summary.status.startswith("DIVERGED")
        return missing, 0.0 if missing else sign * summary.final

    return sorted(summaries, key=order)


def _experiment_id(client: MlflowClient, name: str, tracking_uri: str | None) -> str:
    found, state = experiment_state(client, name)
    if state == "active":
        return found
    if state == "deleted":
        raise ConfigError(f"experiment {name!r} is deleted; restore it or pick another.")
    import mlflow

    names = [
        existing.name
        for existing in client.search_experiments(
            max_results=_MAX_NAMES, order_by=["last_update_time DESC"]
        )
    ]
    where = masked(tracking_uri or mlflow.get_tracking_uri())
    listed = ", ".join(repr(n) for n in names) if names else "none"
    raise ConfigError(f"experiment {name!r} not found at {where} (existing: {listed}).")


def _check_parent(client: MlflowClient, run_id: str, experiment_id: str, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        parent = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"parent run {run_id!r} not found.") from None
    if parent.info.experiment_id != experiment_id:
        raise ConfigError(f"parent run {run_id!r} is not in experiment {name!r}.")


def _all_runs(client: MlflowClient, experiment_id: str) -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=_PAGE, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _summary(client: MlflowClient, run: Run, metric: str, group_by: str) -> RunSummary:
    tags, params, latest = run.data.tags, run.data.params, run.data.metrics
    name = run.info.run_name or run.info.run_id
    label = tags.get(LABEL_TAG) or name
    summary = RunSummary(
        run_id=run.info.run_id,
        run_name=name,
        label=label,
        status=(f"DIVERGED@{tags[DIVERGED_TAG]}" if DIVERGED_TAG in tags else run.info.status),
        optimizer=params.get("optimizer.name"),
        learning_rate=params.get("optimizer.learning_rate"),
        tokens_per_second=_median(client, run, "tokens_per_second"),
        flops_per_second=latest.get("flops_per_second"),
        mfu=latest.get("mfu"),
        compile_seconds=latest.get("compile_seconds"),
        group=params.get(group_by)
        or tags.get(group_by)
        or (label if group_by == "group" else None),
        seed=_integer(params.get("seed")),
        flops_per_step=latest.get("flops_per_step"),
    )
    batch, length = _integer(params.get("batch_size")), _integer(params.get("seq_len"))
    if batch and length:
        summary.tokens_per_step = batch * length
    if metric not in latest:
        return summary
    by_step: dict[int, tuple[int, float]] = {}
    for point in client.get_metric_history(run.info.run_id, metric):
        kept = by_step.get(point.step)
        if kept is None or point.timestamp >= kept[0]:
            by_step[point.step] = (point.timestamp, point.value)
    summary.history = [(step, by_step[step][1]) for step in sorted(by_step)]
    started = run.info.start_time or 0
    summary.seconds = [max(by_step[step][0] - started, 0) / 1000.0 for step in sorted(by_step)]
    if summary.history:
        summary.steps, summary.final = summary.history[-1]
        values = [value for _, value in summary.history if not math.isnan(value)]
        pick = max if metric in HIGHER_IS_BETTER else min
        summary.best = pick(values) if values else math.nan
    return summary


def _integer(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _median(client: MlflowClient, run: Run, metric: str) -> float | None:
    """The median of ``metric``'s logged values, ``None`` if the run never logged it."""
    if metric not in run.data.metrics:
        return None
    values = [p.value for p in client.get_metric_history(run.info.run_id, metric)]
    finite = [value for value in values if math.isfinite(value)]
    return statistics.median(finite) if finite else None


def budget_axis(run: RunSummary, axis: str) -> list[float] | None:
    """The x values of ``run.history`` on budget ``axis`` (one of ``BUDGETS``), or ``None``
    when the run did not log what that axis needs."""
    steps = [float(step) for step, _ in run.history]
    if axis == "steps":
        return steps
    if axis == "seconds":
        return list(run.seconds) if len(run.seconds) == len(steps) else None
    per_step = run.tokens_per_step if axis == "tokens" else run.flops_per_step
    return [step * per_step for step in steps] if per_step else None


def run_names(summaries: Sequence[RunSummary]) -> list[str]:
    """How the table and the chart name each run: its name, and where names repeat, the
    first 8 characters of its id too (``adamw (3f9c01ab)``)."""
    counts = collections.Counter(s.run_name for s in summaries)
    return [
        f"{s.run_name} ({s.run_id[:8]})" if counts[s.run_name] > 1 else s.run_name
        for s in summaries
    ]


def _figure(summaries: Sequence[RunSummary], metric: str, x: str = "steps") -> Figure:
    """Build the chart (one line per run that logged ``metric``, against budget ``x``, one
    of ``BUDGETS``) without pyplot's state."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 5), layout="constrained")
    axes = figure.add_subplot()
    for summary, name in zip(summaries, run_names(summaries), strict=True):
        xs = budget_axis(summary, x) if summary.history else None
        if xs:
            axes.plot(xs, [value for _, value in summary.history], label=name, linewidth=1.5)
    return finish_axes(figure, axes, metric, x)


def finish_axes(figure: Figure, axes: Any, metric: str, x: str, what: str = "") -> Figure:
    """Title, labels, grid and legend of a chart of ``metric`` against budget ``x``."""
    better = "higher" if metric in HIGHER_IS_BETTER else "lower"
    axes.set_title(f"{metric} by {x.removesuffix('s')}{what} ({better} is better)")
    axes.set_xlabel(x.removesuffix("s"))
    axes.set_ylabel(metric)
    axes.grid(True, alpha=0.3)
    if axes.get_lines():
        axes.legend(fontsize="small")
    return figure


def plot_runs(
    summaries: Sequence[RunSummary], metric: str, output: str | Path, x: str = "steps"
) -> Path:
    """Write a PNG line chart of ``metric`` against a budget, one line per run.

    Args:
        summaries: The runs, as returned by :func:`compare_runs`.
        metric: The metric the summaries hold, used for the title and the y axis.
        output: The PNG file to write; missing parent folders are created.
        x: The budget on the x axis: ``steps``, ``tokens``, ``seconds`` or ``flops``
            (a run that did not log what the axis needs is left out).

    Returns:
        The path written.
    """
    return save_png(_figure(summaries, metric, x), output)


def save_png(figure: Figure, output: str | Path) -> Path:
    """Write ``figure`` as a PNG to ``output`` (missing folders created); returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=120)
    return path


def to_csv(summaries: Sequence[RunSummary]) -> str:
    """The runs as CSV text: a header row of ``RunSummary`` field names (no history), a row
    per run, empty cells for missing or non-finite values."""
    import csv
    import io

    fields = [name for name in RunSummary.__dataclass_fields__ if name not in SERIES]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for summary in summaries:
        writer.writerow({k: "" if v is None else v for k, v in summary.to_dict().items()})
    return out.getvalue()
