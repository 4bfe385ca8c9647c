"""The comparison page's view: its columns, its runs, its URL, and ``kithara-ops ui --run``."""

import json
import shutil
from urllib.parse import parse_qs, urlsplit

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from kithara_ops.cli import app
from kithara_ops.tracking import view

runner = CliRunner()


def shared_views(client, experiment_id):
    """The experiment's shared views: key -> the state the MLflow UI loads."""
    tags = client.get_experiment(experiment_id).tags
    views = {}
    for tag, value in tags.items():
        if tag.startswith(view.SHARED_VIEW_TAG):
            envelope = json.loads(value)
            assert envelope["name"] == view.VIEW_NAME
            assert isinstance(envelope["createdAt"], int)
            views[tag.removeprefix(view.SHARED_VIEW_TAG)] = json.loads(envelope["state"])
    return views


def url_key(url):
    """The ``viewStateShareKey`` and ``compareRunsMode`` of a runs-page URL."""
    fragment = urlsplit(url).fragment
    path, _, query = fragment.partition("?")
    found = parse_qs(query)
    return path, found.get("viewStateShareKey", [None])[0], found["compareRunsMode"][0]


@pytest.fixture(scope="module")
def sweep_template(tmp_path_factory):
    """A SQLite store with a sweep of two runs and one run outside it, made once (creating a
    store takes seconds): (db file, experiment id, parent run id)."""
    db = tmp_path_factory.mktemp("sweep") / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    experiment_id = client.create_experiment("cmp")
    parent = client.create_run(experiment_id, run_name="sweep of 2 optimizers").info.run_id
    for name, lr in (("adamw", "0.001"), ("sgd", "0.001")):
        child = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent}).info
        for key, value in (("optimizer.name", name), ("optimizer.learning_rate", lr),
                           ("optimizer.family", "optax"), ("steps", "4")):  # fmt: skip
            client.log_param(child.run_id, key, value)
        for key in ("clipped", "eval_loss", "compile_seconds", "loss", "system/cpu"):
            client.log_metric(child.run_id, key, 1.0, step=2)
    alone = client.create_run(experiment_id).info.run_id
    client.log_param(alone, "optimizer.name", "lion")
    client.log_param(alone, "optimizer.learning_rate", "0.0001")
    return db, experiment_id, parent


@pytest.fixture
def sweep_store(sweep_template, tmp_path):
    """A fresh copy of the sweep store for one test: (uri, experiment id, parent run id)."""
    db, experiment_id, parent = sweep_template
    shutil.copy(db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db", experiment_id, parent


def test_differing_params_are_the_optimizer_keys_whose_values_differ():
    runs = [
        {"optimizer.name": "adamw", "optimizer.family": "optax", "optimizer.b1": "0.9",
         "seed": "0"},
        {"optimizer.name": "sgd", "optimizer.family": "optax", "seed": "1"},
        {"steps": "4"},  # a sweep's parent: no optimizer params, not counted
    ]  # fmt: skip
    assert view.differing_params(runs) == ["optimizer.name", "optimizer.b1"]
    assert view.differing_params(runs[:1]) == []
    chains = [{"optimizer.chain": "adamw(...)", "optimizer.chain.0": "adamw(...)",
               "optimizer.spec": "optax.adamw(1e-3)", "optimizer.eps": "1e-8"},
              {"optimizer.chain": "sgd(...)", "optimizer.chain.0": "sgd(...)",
               "optimizer.spec": "optax.sgd(1e-2)", "optimizer.eps": "1e-8"}]  # fmt: skip
    assert view.differing_params(chains) == []  # whole chains and specs are too wide
    # With every param counted the parent counts too, and lacks what the others have.
    everything = view.differing_params(runs, prefix="")
    assert everything == ["optimizer.name", "optimizer.family", "optimizer.b1", "seed", "steps"]


def test_state_lists_children_as_rows_and_shows_the_columns():
    state = view.comparison_state(["optimizer.name", "optimizer.b1"])
    # The runs page nests children under a collapsed parent when ordered by start time (its
    # default): any other order lists them as rows of their own.
    assert state["orderByKey"] == "metrics.`loss`"
    assert state["orderByKey"] != "attributes.start_time"
    assert state["orderByAsc"] is True
    assert state["selectedColumns"] == [
        "params.`optimizer.name`",
        "params.`optimizer.b1`",
        "metrics.`loss`",
    ]
    assert state["searchFilter"] == ""
    assert state["runsHiddenMode"] == "SHOW_ALL"
    # The table lists params by name whatever the order of selectedColumns: columnOrder puts
    # them right after the run's name, in this order.
    assert state["columnOrder"] == state["selectedColumns"]
    assert "compareRunCharts" not in state  # no metric: the page's own charts
    focused = view.comparison_state([], metric="eval_loss", parent_run_id="abc123")
    assert focused["searchFilter"] == "tags.mlflow.parentRunId = 'abc123'"
    assert focused["orderByKey"] == "metrics.`eval_loss`"


def test_runs_that_repeat_a_group_are_shown_grouped_by_it():
    plain = view.comparison_state(["optimizer.name"])
    assert "groupBy" not in plain
    grouped = view.comparison_state(["optimizer.name"], group_by="group")
    assert grouped["groupBy"] == {
        "aggregateFunction": "average",
        "groupByKeys": [{"mode": "param", "groupByData": "group"}],
    }
    assert grouped["useGroupedValuesInCharts"] is True
    assert view.share_key(grouped) != view.share_key(plain)
    seeds = [{"group": "adamw", "seed": "0"}, {"group": "adamw", "seed": "1"}, {"group": "sgd"}]
    assert view.repeated_groups(seeds)
    assert not view.repeated_groups([{"group": "adamw"}, {"group": "sgd"}, {}])  # one seed


def test_charts_show_loss_and_eval_loss_first_then_the_other_metrics_by_name():
    metrics = ["clipped", "compile_seconds", "eval_loss", "grad_norm", "loss", "system/cpu",
               "optimizer/lr", "accuracy"]  # fmt: skip
    assert view.chart_order(metrics) == [
        "loss", "eval_loss", "accuracy", "clipped", "compile_seconds", "grad_norm", "optimizer/lr"
    ]  # fmt: skip
    assert view.chart_order(["perplexity", "eval_loss"]) == ["eval_loss", "perplexity"]
    state = view.comparison_state(["optimizer.name"], metrics=metrics)
    charts = state["compareRunCharts"]
    assert [chart["metricKey"] for chart in charts] == view.chart_order(metrics)
    assert [chart["displayName"] for chart in charts][:2] == ["loss", "eval_loss"]
    assert charts[-1]["displayName"] == "lr"
    # Charts as the page makes them for a new metric (it turns a bar chart into a line chart
    # once it sees a step past 0), each in its metric's section, under ids of its own.
    assert {chart["type"] for chart in charts} == {"BAR"}
    assert all(chart["isGenerated"] and not chart["deleted"] for chart in charts)
    assert len({chart["uuid"] for chart in charts}) == len(charts)
    sections = {section["uuid"]: section for section in state["compareRunSections"]}
    assert [s["name"] for s in state["compareRunSections"]] == [
        "Model metrics", "optimizer", "System metrics"
    ]  # fmt: skip
    assert {sections[chart["metricSectionId"]]["name"] for chart in charts[:-1]} == {
        "Model metrics"
    }
    assert sections[charts[-1]["metricSectionId"]]["name"] == "optimizer"
    # A metric logged later goes after these, not sorted in before loss; sections keep their
    # order, model metrics first; the system metrics are the page's, charted by name.
    assert state["isAccordionReordered"] is True
    assert [s["isReordered"] for s in state["compareRunSections"]] == [True, True, False]
    assert view.share_key(state) == view.share_key(
        view.comparison_state(["optimizer.name"], metrics=reversed(metrics))
    )


@pytest.mark.parametrize("run_id", ["a' OR 1=1 --", "", "a b"])
def test_children_filter_refuses_what_is_not_a_run_id(run_id):
    with pytest.raises(ValueError, match="not an MLflow run id"):
        view.children_filter(run_id)


def test_share_key_names_the_state():
    one = view.comparison_state(["optimizer.name"])
    assert view.share_key(one) == view.share_key(dict(reversed(one.items())))
    assert view.share_key(one) != view.share_key(view.comparison_state(["optimizer.b1"]))
    assert view.share_key(one).startswith("kithara-ops-")


def test_runs_url_is_the_chart_page_loading_the_view():
    url = view.runs_url("http://127.0.0.1:5000/", "7", "kithara-ops-0123")
    assert url == (
        "http://127.0.0.1:5000/#/experiments/7/runs"
        "?viewStateShareKey=kithara-ops-0123&compareRunsMode=CHART"
    )
    assert (
        view.runs_url("http://h:1", "7") == "http://h:1/#/experiments/7/runs?compareRunsMode=CHART"
    )


def test_share_comparison_writes_one_view_with_the_differing_columns(sweep_store):
    uri, experiment_id, parent = sweep_store
    client = MlflowClient(uri)
    key = view.share_comparison(client, experiment_id)
    assert view.share_comparison(client, experiment_id) == key  # the same view: one tag
    state = shared_views(client, experiment_id)[key]
    assert state["selectedColumns"] == [
        "params.`optimizer.name`",
        "params.`optimizer.learning_rate`",
        "params.`optimizer.family`",  # the run outside the sweep has none
        "metrics.`loss`",
    ]
    assert state["searchFilter"] == ""
    charted = [chart["metricKey"] for chart in state["compareRunCharts"]]
    assert charted == ["loss", "eval_loss", "clipped", "compile_seconds"]

    focused = view.share_comparison(client, experiment_id, parent_run_id=parent)
    views = shared_views(client, experiment_id)
    assert set(views) == {key, focused}
    # Within the sweep only the name differs: same learning rate, same family.
    assert views[focused]["selectedColumns"] == ["params.`optimizer.name`", "metrics.`loss`"]
    assert views[focused]["searchFilter"] == f"tags.mlflow.parentRunId = '{parent}'"
    children = client.search_runs([experiment_id], views[focused]["searchFilter"])
    assert len(children) == 2


# --- kithara-ops ui --run --------------------------------------------------------------


def run_ui(uri, *args):
    return runner.invoke(app, ["ui", "--tracking-uri", uri, "--port", "5125", "--print-url", *args])


def error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_ui_run_prints_the_page_of_that_sweep_only(sweep_store):
    uri, experiment_id, parent = sweep_store
    result = run_ui(uri, "--run", parent)
    assert result.exit_code == 0, result.output
    url = result.stdout.strip().removeprefix("MLflow UI: ")
    assert url.startswith("http://127.0.0.1:5125/#/")
    path, key, mode = url_key(url)
    assert (path, mode) == (f"/experiments/{experiment_id}/runs", "CHART")
    state = shared_views(MlflowClient(uri), experiment_id)[key]
    assert state["searchFilter"] == f"tags.mlflow.parentRunId = '{parent}'"

    result = run_ui(uri, "--experiment", "cmp")
    assert result.exit_code == 0, result.output
    _, whole, _ = url_key(result.stdout.strip().removeprefix("MLflow UI: "))
    assert whole != key
    assert shared_views(MlflowClient(uri), experiment_id)[whole]["searchFilter"] == ""


def test_ui_run_refuses_what_is_not_a_sweep_in_one_line(sweep_store):
    uri, experiment_id, parent = sweep_store
    client = MlflowClient(uri)
    client.create_experiment("other")
    lonely = client.search_runs([experiment_id], "params.`optimizer.name` = 'lion'")[0]
    cases = [
        (["--run", "0" * 32], "'" + "0" * 32 + "' cannot be read"),
        (["--run", "x' OR '1'='1"], "is not an MLflow run id"),
        (["--run", lonely.info.run_id], "has no child runs"),
        (["--run", parent, "--experiment", "other"], "is in experiment 'cmp', not 'other'"),
    ]
    for args, message in cases:
        result = run_ui(uri, *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in error_line(result), args
    assert shared_views(client, experiment_id) == {}


def test_ui_falls_back_to_the_plain_chart_page_when_the_view_cannot_be_saved(
    sweep_store, monkeypatch
):
    uri, experiment_id, _ = sweep_store

    def refuse(*args, **kwargs):
        raise MlflowException("Permission denied: read-only experiment")

    monkeypatch.setattr(MlflowClient, "set_experiment_tag", refuse)
    result = run_ui(uri, "--experiment", "cmp")
    assert result.exit_code == 0, result.output
    url = result.stdout.strip().removeprefix("MLflow UI: ")
    assert url == f"http://127.0.0.1:5125/#/experiments/{experiment_id}/runs?compareRunsMode=CHART"
    assert "Permission denied" in result.stderr and "could not be saved" in result.stderr


def test_sweep_points_a_local_store_at_the_ui_command_that_serves_its_page():
    from kithara_ops.cli.sweep_runs import ui_pointer as _ui_pointer

    # conftest points MLFLOW_TRACKING_URI at a local SQLite store: nothing serves it yet.
    assert _ui_pointer(None, "1", "abc123", "loss") == "kithara-ops ui --run abc123"
    assert (
        _ui_pointer("sqlite:///my runs/x.db", "1", "abc123", "loss")
        == "kithara-ops ui --tracking-uri 'sqlite:///my runs/x.db' --run abc123"
    )
