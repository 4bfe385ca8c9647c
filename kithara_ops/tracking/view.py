"""The MLflow UI page that compares an experiment's runs: every loss curve, optimizer columns.

MLflow's runs page keeps its column selection in the browser, not in the URL; the one way a
link can carry it is a *shared view*: an experiment tag ``mlflow.sharedViewState.<key>``
that the page loads when the URL has ``viewStateShareKey=<key>`` (what the UI's own "Share"
button writes). ``share_comparison`` writes such a view:

- ordered by the last ``loss``, best first. Ordering by anything but the start time is what
  makes the page list child runs (a sweep's) as rows of their own instead of nesting them
  under a collapsed parent, whose charts would then be empty;
- with the ``optimizer.*`` params whose values differ between the runs as columns, and the
  metric's last value, right after the run's name (``columnOrder``: the table itself lists
  the params by name, whatever the order of ``selectedColumns``);
- with the ``loss`` and ``eval_loss`` charts first, then the runs' other metrics by name
  (``compareRunCharts`` and ``compareRunSections``: without them the page makes one chart a
  metric, by name);
- every run drawn in the charts (not only the first ten), legends by run name, which is the
  optimizer label unless a run was named otherwise;
- for one sweep, only that sweep's runs (``tags.mlflow.parentRunId = '<parent>'``);
- where runs repeat a group (a seeded sweep: one optimizer over several seeds), grouped by
  the ``group`` param: a table row and a chart curve per group, its runs' mean with a band.

The key is a hash of the view, so writing the same view twice writes one tag.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlencode

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

SHARED_VIEW_TAG = "mlflow.sharedViewState."
"""Prefix of the experiment tags the MLflow UI reads shared views from (tested: MLflow 3.17)."""
SHARE_KEY_PARAM = "viewStateShareKey"
"""The runs page's URL parameter naming the shared view to load."""
VIEW_NAME = "kithara-ops comparison"
"""The view's name, shown in the UI's view menu and its "shared view" banner."""
PARAM_PREFIX = "optimizer."
"""The params the columns are chosen from: the optimizer's, the same keys for every family."""
FIRST_COLUMNS = ("optimizer.name", "optimizer.learning_rate", "optimizer.weight_decay",
                 "optimizer.clipping", "optimizer.family")  # fmt: skip
"""The columns that tell optimizers apart at a glance, shown first when they differ."""
LONG_TEXT = re.compile(r"optimizer\.(chain(\.\d+)?|spec)")
"""Params left out of the columns: a whole chain or spec is too wide for a table cell."""
RUN_ID = re.compile(r"[0-9A-Za-z_-]+")
"""What an MLflow run id is made of; anything else is refused before it enters a filter."""
MAX_RUNS = 1000
"""The most runs read to choose the columns; a bigger experiment is judged by its newest."""
FIRST_CHARTS = ("loss", "eval_loss")
"""The charts shown first (of those the runs logged), in this order."""
MODEL_SECTION = "Model metrics"
"""The chart section of the metrics without a ``/`` in their key (the UI's name for it)."""
SYSTEM_SECTION = "System metrics"
"""The chart section of the ``system/`` metrics, which the view leaves to the UI."""
SYSTEM_PREFIX = "system/"
GROUP_PARAM = "group"
"""The param a run's group is logged under (its optimizer's label unless set)."""


def column(kind: str, key: str) -> str:
    """The runs table's name of a column: ``params.`optimizer.name```, ``metrics.`loss```."""
    return f"{kind}.`{key}`"


def differing_params(runs: Iterable[Mapping[str, str]], prefix: str = PARAM_PREFIX) -> list[str]:
    """The param keys starting with ``prefix`` whose value is not the same in every run.

    Each run is its params as a mapping. A key that some runs lack differs too; runs with no
    such param at all (a sweep's parent) are not counted, nor are the long texts that repeat
    the others (``optimizer.chain``, ``optimizer.spec``: the run name says as much).
    ``FIRST_COLUMNS`` come first, then the rest by name (MLflow's table itself shows params
    by name).
    """
    tracked = [
        {k: v for k, v in params.items() if k.startswith(prefix) and not LONG_TEXT.fullmatch(k)}
        for params in runs
    ]
    tracked = [params for params in tracked if params]
    keys = sorted({key for params in tracked for key in params})
    differing = [key for key in keys if len({params.get(key) for params in tracked}) > 1]
    first = [key for key in FIRST_COLUMNS if key in differing]
    return first + [key for key in differing if key not in first]


def comparison_state(
    columns: Iterable[str],
    metric: str = "loss",
    parent_run_id: str | None = None,
    metrics: Iterable[str] = (),
    group_by: str | None = None,
) -> dict:
    """The runs page's state showing every run's ``metric`` curve and the given param columns.

    Args:
      columns: param keys to show as table columns, in order.
      metric: the metric runs are ordered by (ascending) and shown as a column.
      parent_run_id: show only the child runs of this run (a sweep).
      metrics: the metric keys the runs logged, to chart in ``chart_order``.
      group_by: a param gathering runs into groups (``group``: an optimizer's seeds): the
        table shows a row per group and the charts one curve per group, the mean of its runs
        with a band from their minimum to their maximum.
    """
    search = children_filter(parent_run_id) if parent_run_id else ""
    selected = [column("params", key) for key in columns] + [column("metrics", metric)]
    state = {
        "searchFilter": search,
        "orderByKey": column("metrics", metric),
        "orderByAsc": True,
        "selectedColumns": selected,
        "columnOrder": selected,
        "runsHiddenMode": "SHOW_ALL",
        **chart_state(metrics),
    }
    if group_by:
        state["groupBy"] = {
            "aggregateFunction": "average",
            "groupByKeys": [{"mode": "param", "groupByData": group_by}],
        }
        state["useGroupedValuesInCharts"] = True
    return state


def repeated_groups(runs: Iterable[Mapping[str, str]], key: str = GROUP_PARAM) -> bool:
    """Whether some value of the ``key`` param is shared by several runs (seeds of one
    optimizer), so that the page should show groups rather than runs."""
    values = [params[key] for params in runs if key in params]
    return len(set(values)) < len(values)


def chart_order(metrics: Iterable[str]) -> list[str]:
    """The metrics charted, in order: ``FIRST_CHARTS``, then the rest by name.

    The ``system/`` metrics are left out: the UI charts them in a section of their own.
    """
    keys = {key for key in metrics if not key.startswith(SYSTEM_PREFIX)}
    first = [key for key in FIRST_CHARTS if key in keys]
    return first + sorted(keys.difference(first))


def _section_name(key: str) -> str:
    """The chart section of a metric, as the UI names it: what comes before its last ``/``."""
    return key.rpartition("/")[0] or MODEL_SECTION


def chart_state(metrics: Iterable[str]) -> dict:
    """The chart view's state: a chart for each metric, in ``chart_order``; none if no metric.

    Each chart is what the UI makes for a new metric (a bar chart, which it turns into a line
    chart once it sees the metric logged at a step past 0), under a fixed id so that the same
    metrics make the same state. The sections are marked reordered: a metric logged later is
    charted after these, not sorted in among them, and the model metrics stay the first
    section (the UI sorts sections by name unless ``isAccordionReordered``). The system
    metrics' section is not: the UI charts those by name.
    """
    keys = chart_order(metrics)
    if not keys:
        return {}
    named = {_section_name(key) for key in keys}
    sections = [MODEL_SECTION, *sorted(named - {MODEL_SECTION}), SYSTEM_SECTION]
    uuid = {name: f"kithara-ops-section-{i}" for i, name in enumerate(sections)}
    charts = [
        {
            "uuid": f"kithara-ops-chart-{i}",
            "type": "BAR",
            "runsCountToCompare": 10,
            "metricSectionId": uuid[_section_name(key)],
            "deleted": False,
            "isGenerated": True,
            "metricKey": key,
            "displayName": key.rpartition("/")[2] or key,
        }
        for i, key in enumerate(keys)
    ]
    return {
        "compareRunCharts": charts,
        "compareRunSections": [
            {
                "uuid": uuid[name],
                "name": name,
                "display": True,
                "isReordered": name != SYSTEM_SECTION,
            }
            for name in sections
        ],
        "isAccordionReordered": True,
    }


def children_filter(parent_run_id: str) -> str:
    """The MLflow search filter for the child runs of ``parent_run_id``."""
    if not RUN_ID.fullmatch(parent_run_id):
        raise ValueError(f"not an MLflow run id: {parent_run_id!r}")
    return f"tags.mlflow.parentRunId = '{parent_run_id}'"


def share_key(state: Mapping) -> str:
    """A key naming ``state``: the same state gets the same key."""
    text = json.dumps(state, sort_keys=True)
    return "kithara-ops-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def runs_url(base: str, experiment_id: str, key: str | None = None) -> str:
    """The runs page of an experiment in chart mode, loading the shared view ``key`` if any."""
    query = {SHARE_KEY_PARAM: key} if key else {}
    query["compareRunsMode"] = "CHART"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{urlencode(query)}"


def _envelope(state: Mapping) -> str:
    """A saved view as MLflow 3's UI stores it: a name, times and the state as JSON text."""
    now = int(time.time() * 1000)
    return json.dumps(
        {"name": VIEW_NAME, "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
    )


def share_comparison(
    client: MlflowClient,
    experiment_id: str,
    metric: str = "loss",
    parent_run_id: str | None = None,
) -> str:
    """Write the comparison view of an experiment (or of one sweep) as a shared view.

    The columns are chosen from the runs there now: runs added later show in the page but
    may differ in a param that has no column; calling this again adds it.

    Returns:
      The view's key, for ``runs_url``.
    """
    search = children_filter(parent_run_id) if parent_run_id else ""
    runs = client.search_runs([experiment_id], search, max_results=MAX_RUNS)
    grouped = repeated_groups(run.data.params for run in runs)
    state = comparison_state(
        differing_params(run.data.params for run in runs),
        metric,
        parent_run_id,
        metrics={key for run in runs for key in run.data.metrics},
        group_by=GROUP_PARAM if grouped else None,
    )
    key = share_key(state)
    tag = SHARED_VIEW_TAG + key
    if tag not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, tag, _envelope(state))
    return key
