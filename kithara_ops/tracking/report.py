"""The comparison report: one self-contained HTML page of a sweep (or an experiment).

Everything is inline (charts as PNG data URIs, styles in the page) and the page forbids
itself any request (a ``Content-Security-Policy`` of ``default-src 'none'``), so it opens
the same from a laptop, an MLflow artifact view or an archive. It holds:

- per budget axis (steps, tokens, seconds, FLOPs) each group's mean curve with its band;
- the statistics table of ``compare --group`` (``groups.GroupStats``), every number also
  in the cell's ``data-value`` attribute as ``compare --json`` prints it;
- stability (diverged runs, non-finite steps skipped), train-state bytes per parameter,
  step time, and each optimizer's full description (its Optax chain).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

from kithara_ops.config.credentials import take_credentials
from kithara_ops.tracking.compare import BUDGETS, RunSummary, compare_runs
from kithara_ops.tracking.groups import GroupStats, group_curve, group_statistics, groups_figure

REPORT_ARTIFACT = "report/report.html"
"""Where a sweep's parent run keeps its report."""
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
"""The page's Content-Security-Policy: no request of any kind, inline images and styles."""

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #1f2328; }
table { border-collapse: collapse; margin: 8px 0 20px; }
th, td { border-bottom: 1px solid #d0d7de; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child, td.text { text-align: left; }
pre { background: #f6f8fa; padding: 8px; overflow-x: auto; font-size: 12px; }
img { max-width: 100%; }
.better { color: #1a7f37; } .worse { color: #cf222e; }
"""

COLUMNS = (
    ("group", "group"), ("n", "n"), ("diverged", "diverged"), ("mean", "mean"),
    ("ci95", "95% interval"), ("std", "std"), ("best_mean", "best (mean)"),
    ("reached", "reached target"), ("steps_to_target", "steps to target"),
    ("versus", "versus"), ("difference", "difference"), ("difference_ci95", "its 95% interval"),
    ("test", "test"), ("p_value", "p"), ("verdict", "verdict"),
)  # fmt: skip
"""The statistics table's columns: ``GroupStats`` fields and their headers."""


def build_report(
    experiment: str,
    *,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    metric: str = "loss",
    test: str = "t",
    target: float | None = None,
    summaries: Sequence[RunSummary] | None = None,
) -> str:
    """The report's HTML for the runs of ``experiment`` (the children of ``parent_run_id``).

    Args:
      experiment: the experiment's name.
      tracking_uri: the tracking server or store (``None``: MLflow's default).
      parent_run_id: a sweep's parent run: only its children are compared.
      metric: the compared metric.
      test: ``t`` or ``wilcoxon`` for runs paired by seed (see ``groups.group_statistics``).
      target: a value of the metric, for the budgets to reach it.
      summaries: the runs as ``compare_runs`` read them for ``metric``, when the caller has
        them already; else they are read.
    """
    from mlflow.tracking import MlflowClient

    tracking_uri = take_credentials(tracking_uri)
    if summaries is None:
        summaries = compare_runs(
            experiment, tracking_uri=tracking_uri, metric=metric, parent_run_id=parent_run_id
        )
    groups = group_statistics(summaries, metric, test=test, target=target)
    client = MlflowClient(tracking_uri)
    runs = {s.run_id: client.get_run(s.run_id) for s in summaries}
    title = f"{metric}: {len(groups)} groups, {len(summaries)} runs of experiment {experiment!r}"
    parts = [f"<h1>{_text(title)}</h1>", _design(client, parent_run_id)]
    parts += ["<h2>Curves</h2>", *_charts(groups, metric)]
    parts += ["<h2>Statistics</h2>", _statistics(groups)]
    parts += ["<h2>Stability and cost</h2>", _costs(groups, runs)]
    parts += _sensitivity(runs.values())
    parts += ["<h2>Optimizers</h2>", *_descriptions(client, groups)]
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{POLICY}\">"
        f"<title>{_text(title)}</title><style>{_STYLE}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>"
    )


def log_report(client: Any, parent_run_id: str, page: str) -> None:
    """Log ``page`` to ``parent_run_id`` as ``REPORT_ARTIFACT``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(REPORT_ARTIFACT).name
        path.write_text(page, encoding="utf-8")
        client.log_artifact(
            parent_run_id, str(path), artifact_path=str(Path(REPORT_ARTIFACT).parent)
        )


def _text(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _cell(value: Any) -> str:
    """A table cell: the value shown short, and exactly (as JSON) in ``data-value``."""
    exact = _text(json.dumps(value))
    if value is None:
        shown = "-"
    elif isinstance(value, float):
        shown = f"{value:.4g}"
    elif isinstance(value, list):
        shown = "[" + ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value) + "]"
    else:
        shown = str(value)
    kind = "text" if isinstance(value, str) else "number"
    verdict = f" {value}" if value in ("better", "worse") else ""
    return f"<td class='{kind}{verdict}' data-value=\"{exact}\">{_text(shown)}</td>"


def _statistics(groups: Sequence[GroupStats]) -> str:
    header = "".join(f"<th>{_text(title)}</th>" for _, title in COLUMNS)
    rows = []
    for group in groups:
        values = group.to_dict()
        cells = "".join(_cell(values[key]) for key, _ in COLUMNS)
        rows.append(f'<tr data-group="{_text(group.group)}">{cells}</tr>')
    note = ("<p>Mean, std (ddof=1) and Student's 95% interval of each run's final value; each "
            "group against the best (the best against the runner-up): paired over seeds "
            "when the groups ran the same seeds, else Welch's t; verdict at p &lt; 0.05.</p>")  # fmt: skip
    return f"{note}<table id='statistics'><tr>{header}</tr>{''.join(rows)}</table>"


def _png(figure: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _charts(groups: Sequence[GroupStats], metric: str) -> list[str]:
    out = []
    for axis in BUDGETS:
        if not any(group_curve(group, axis) for group in groups):
            continue  # the runs did not log what this axis needs
        image = _png(groups_figure(groups, metric, axis))
        alt = f"{metric} against {axis}: mean and ± one std per group"
        out.append(f"<img alt='{_text(alt)}' src='data:image/png;base64,{image}'>")
    return out or ["<p>No run logged the metric.</p>"]


def _sensitivity(runs: Any) -> list[str]:
    """The search's trials: each optimizer's final eval_loss against what was tuned."""
    from kithara_ops.tracking.sensitivity import (
        sensitivity,
        sensitivity_figure,
        sensitivity_rows,
    )

    found = sensitivity(runs)
    if not found:
        return []
    rows = sensitivity_rows(found)
    header = "".join(f"<th>{_text(k)}</th>" for k in rows[0])
    body = "".join(
        f"<tr data-group='{_text(r['group'])}'>" + "".join(_cell(v) for v in r.values()) + "</tr>"
        for r in rows
    )
    image = _png(sensitivity_figure(found))
    alt = "final eval_loss against each tuned hyperparameter, per optimizer"
    return [
        "<h2>Sensitivity</h2>",
        f"<img alt='{_text(alt)}' src='data:image/png;base64,{image}'>",
        f"<table id='sensitivity'><tr>{header}</tr>{body}</table>",
    ]


def _design(client: Any, parent_run_id: str | None) -> str:
    if parent_run_id is None:
        return "<p>Every run of the experiment.</p>"
    params = client.get_run(parent_run_id).data.params
    specs = [params[key] for key in sorted(params) if key.startswith("sweep.optimizer.")]
    lines = [f"<li><code>{_text(spec)}</code></li>" for spec in specs]
    seeds = params.get("sweep.seeds", params.get("seed", "-"))
    budget = params.get("steps") or params.get("epochs") or "-"
    return (f"<p>Sweep <code>{_text(parent_run_id)}</code>: seeds {_text(seeds)}, budget "
            f"{_text(budget)} steps each.</p><ul>{''.join(lines)}</ul>")  # fmt: skip


def _costs(groups: Sequence[GroupStats], runs: dict[str, Any]) -> str:
    rows = []
    for group in groups:
        members = [runs[s.run_id] for s in group.members]
        skipped = sum(r.data.metrics.get("nonfinite_steps", 0.0) for r in members)
        per_param = [
            r.data.metrics["state_bytes"] / float(r.data.params["num_params"])
            for r in members
            if "state_bytes" in r.data.metrics and r.data.params.get("num_params", "0") != "0"
        ]
        rows.append(
            "<tr>" + _cell(group.group) + _cell(group.diverged) + _cell(float(skipped))
            + _cell(_median(per_param)) + _cell(_step_seconds(group.members)) + "</tr>"
        )  # fmt: skip
    header = ("<tr><th>group</th><th>diverged runs</th><th>non-finite steps skipped</th>"
              "<th>train-state bytes per parameter</th><th>step time (s, median)</th></tr>")  # fmt: skip
    return f"<table id='costs'>{header}{''.join(rows)}</table>"


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _step_seconds(members: Sequence[RunSummary]) -> float | None:
    """Median seconds per step: tokens per step over the run's median tokens per second."""
    values = [
        s.tokens_per_step / s.tokens_per_second
        for s in members
        if s.tokens_per_step and s.tokens_per_second and math.isfinite(s.tokens_per_second)
    ]
    return _median(values)


def _descriptions(client: Any, groups: Sequence[GroupStats]) -> list[str]:
    out = []
    for group in groups:
        if not group.members:
            continue
        run_id = group.members[0].run_id
        try:  # without MLflow's progress bar, which would draw one per optimizer
            quiet = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
            with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ, quiet):
                path = client.download_artifacts(run_id, "optimizer/optimizer.json", tmp)
                text = json.dumps(json.loads(Path(path).read_text()), indent=2)
        except Exception:  # a run logged before the description was an artifact
            text = client.get_run(run_id).data.params.get("optimizer.chain", "(not logged)")
        out.append(f"<h3>{_text(group.group)}</h3><pre>{_text(text)}</pre>")
    return out
