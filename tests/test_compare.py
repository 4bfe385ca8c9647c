"""``compare_runs``, the chart, the table and ``kithara-ops compare`` on real MLflow stores.

Runs are written with ``MlflowClient`` the way a training run logs them (tags, params, metrics
by global step) into a SQLite store in a temporary folder, and once into a real
``mlflow server``.
"""

import json
import math
import uuid

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from rich.console import Console
from typer.testing import CliRunner

from kithara_ops.cli import app
from kithara_ops.errors import ConfigError
from kithara_ops.tracking.compare import RunSummary, _figure, compare_runs, plot_runs
from kithara_ops.tracking.compare_table import format_table

runner = CliRunner()
EXPERIMENT = "kithara-ops"
STEPS = [10 * i for i in range(1, 11)]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# label -> (family, optimizer name, learning rate, loss by step, status)
RUNS = {
    "optax:clip+adamw lr=1e-3": (
        "optax",
        "adamw",
        "0.001",
        [5.5, 4.75, 4.0, 3.5, 3.0, 2.5, 2.0, 1.75, 1.5, 1.25],
        "FINISHED",
    ),
    "keras:AdamW lr=3e-4": (
        "keras",
        "adamw",
        "0.0003",
        [5.5, 5.0, 4.5, 4.0, 3.0, 2.0, 1.0, 1.25, 1.5, 1.625],
        "FINISHED",
    ),
    "optax:sgd lr=1e-2": (
        "optax",
        "sgd",
        "cosine_decay(0.01, 100)",
        [5.5, 5.25, 5.0, 4.75, 4.5, 4.25, 4.0, 3.75],
        "FAILED",
    ),
}
ORDER = ["optax:clip+adamw lr=1e-3", "keras:AdamW lr=3e-4", "optax:sgd lr=1e-2"]
EXPECTED = {  # label -> (steps, final, best, median tokens_per_second)
    "optax:clip+adamw lr=1e-3": (100, 1.25, 1.25, 750.0),
    "keras:AdamW lr=3e-4": (100, 1.625, 1.0, 1500.0),
    "optax:sgd lr=1e-2": (80, 3.75, 3.75, 2250.0),
}


def populate(uri: str, artifacts=None, experiment_name: str = EXPERIMENT) -> dict[str, str]:
    """Write one parent with the three runs of ``RUNS`` as children, and a run elsewhere.

    Returns:
        Run IDs by label, plus ``"parent"`` and ``"other"``.
    """
    client = MlflowClient(uri)
    location = {"artifact_location": artifacts.as_uri()} if artifacts is not None else {}
    kind = {"mlflow.experimentKind": "custom_model_development"}
    experiment = client.create_experiment(experiment_name, tags=kind, **location)
    other = client.create_experiment(f"{experiment_name}-other", tags=kind, **location)
    parent = client.create_run(experiment, run_name="sweep").info.run_id
    ids = {"parent": parent}
    for rank, (label, (family, name, lr, losses, status)) in enumerate(RUNS.items(), start=1):
        tags = {"mlflow.parentRunId": parent, "optimizer.family": family}
        if rank != 3:  # the third run has no label tag: its run name stands in
            tags["optimizer.label"] = label
        run_id = client.create_run(experiment, run_name=label, tags=tags).info.run_id
        metrics = [Metric("loss", loss, 1000 + step, step) for step, loss in zip(STEPS, losses)]
        metrics += [
            Metric("tokens_per_second", 500.0 * rank, 1000 + STEPS[0], STEPS[0]),
            Metric("tokens_per_second", 1000.0 * rank, 1000 + STEPS[1], STEPS[1]),
        ]
        if rank == 1:
            metrics.append(Metric("eval_loss", 1.5, 1000 + STEPS[-1], STEPS[-1]))
        params = [
            Param("optimizer.family", family),
            Param("optimizer.name", name),
            Param("optimizer.learning_rate", lr),
            Param("steps", "100"),
        ]
        client.log_batch(run_id, metrics=metrics, params=params)
        client.set_terminated(run_id, status)
        ids[label] = run_id
    client.set_terminated(parent)
    stray = client.create_run(other, run_name="elsewhere").info.run_id
    client.log_batch(stray, metrics=[Metric("loss", 0.5, 1000, 10)])
    client.set_terminated(stray)
    ids["other"] = stray
    return ids


def make_store(folder):
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    return uri, populate(uri, folder / "artifacts")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store with the runs of ``populate``, shared by tests that only read it."""
    return make_store(tmp_path_factory.mktemp("store"))


@pytest.fixture
def fresh_store(tmp_path):
    """The same runs in a store of this test's own, for tests that write to it."""
    return make_store(tmp_path)


def check_summaries(summaries: list[RunSummary], ids: dict[str, str]) -> None:
    assert [s.label for s in summaries] == ORDER
    for summary in summaries:
        _, name, lr, losses, status = RUNS[summary.label]
        steps, final, best, tokens = EXPECTED[summary.label]
        assert summary.run_id == ids[summary.label]
        assert summary.run_name == summary.label
        assert (summary.steps, summary.final, summary.best) == (steps, final, best)
        assert summary.tokens_per_second == tokens
        assert (summary.optimizer, summary.learning_rate, summary.status) == (name, lr, status)
        assert summary.history == list(zip(STEPS, losses))


def invoke(*args, **kwargs):
    return runner.invoke(app, ["compare", *args], **kwargs)


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


def test_compare_runs_summarises_children_sorted_by_final_loss(store):
    uri, ids = store
    summaries = compare_runs(EXPERIMENT, tracking_uri=uri)
    check_summaries(summaries, ids)
    assert ids["parent"] not in {s.run_id for s in summaries}


def test_parent_filter_keeps_only_that_parents_children(fresh_store):
    uri, ids = fresh_store
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    second = client.create_run(experiment, run_name="second sweep").info.run_id
    child = client.create_run(
        experiment,
        run_name="optax:lion lr=1e-4",
        tags={"mlflow.parentRunId": second, "optimizer.label": "optax:lion lr=1e-4"},
    ).info.run_id
    client.log_metric(child, "loss", 0.75, step=10)
    loose = client.create_run(experiment, run_name="no parent").info.run_id

    everything = compare_runs(EXPERIMENT, tracking_uri=uri)
    assert [s.label for s in everything] == ["optax:lion lr=1e-4", *ORDER, "no parent"]
    assert everything[-1].final is None and everything[-1].history == []
    assert {ids["parent"], second}.isdisjoint(s.run_id for s in everything)
    assert loose in {s.run_id for s in everything}

    check_summaries(compare_runs(EXPERIMENT, tracking_uri=uri, parent_run_id=ids["parent"]), ids)
    only = compare_runs(EXPERIMENT, tracking_uri=uri, parent_run_id=second)
    assert [(s.run_id, s.final, s.steps) for s in only] == [(child, 0.75, 10)]


def test_other_metrics_missing_values_and_higher_is_better(store):
    uri, _ = store
    evals = compare_runs(EXPERIMENT, tracking_uri=uri, metric="eval_loss")
    assert evals[0].label == ORDER[0]
    assert (evals[0].final, evals[0].best, evals[0].steps) == (1.5, 1.5, 100)
    assert all(s.final is s.best is s.steps is None and s.history == [] for s in evals[1:])
    assert {s.label for s in evals[1:]} == set(ORDER[1:])

    speed = compare_runs(EXPERIMENT, tracking_uri=uri, metric="tokens_per_second")
    assert [s.label for s in speed] == list(reversed(ORDER))  # fastest first
    assert [(s.final, s.best) for s in speed] == [
        (3000.0, 3000.0),
        (2000.0, 2000.0),
        (1000.0, 1000.0),
    ]


def test_a_resumed_runs_repeated_step_keeps_the_last_value_and_nan_is_not_best(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment(EXPERIMENT, artifact_location=tmp_path.as_uri())
    run = client.create_run(experiment, run_name="resumed").info.run_id
    client.log_batch(
        run,
        metrics=[
            Metric("loss", 3.0, 1, 10),
            Metric("loss", 9.0, 2, 20),  # logged before the crash ...
            Metric("loss", 2.0, 3, 20),  # ... and again after resuming from step 10
            Metric("loss", math.nan, 4, 30),
        ],
        tags=[RunTag("optimizer.label", "resumed")],
    )
    (summary,) = compare_runs(EXPERIMENT, tracking_uri=uri)
    assert summary.history[:2] == [(10, 3.0), (20, 2.0)]
    assert summary.steps == 30 and math.isnan(summary.final)
    assert summary.best == 2.0
    assert summary.to_dict()["final"] is None
    assert summary.status == "RUNNING"


def test_unknown_experiment_or_parent_is_a_config_error_naming_it(store):
    uri, ids = store
    with pytest.raises(ConfigError, match="experiment 'nope' not found") as err:
        compare_runs("nope", tracking_uri=uri)
    assert "'kithara-ops'" in str(err.value) and "'kithara-ops-other'" in str(err.value)
    with pytest.raises(ConfigError, match="not found"):
        compare_runs(EXPERIMENT, tracking_uri=uri, parent_run_id="0" * 32)
    with pytest.raises(ConfigError, match="not in experiment"):
        compare_runs(EXPERIMENT, tracking_uri=uri, parent_run_id=ids["other"])


def test_chart_has_one_labelled_line_per_run_and_is_a_png(store, tmp_path):
    uri, _ = store
    summaries = compare_runs(EXPERIMENT, tracking_uri=uri)
    figure = _figure(summaries, "loss")
    (axes,) = figure.axes
    assert len(axes.get_lines()) == 3
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ORDER
    assert list(axes.get_lines()[2].get_xdata()) == STEPS[:8]
    assert axes.get_ylabel() == "loss" and "loss" in axes.get_title()

    path = plot_runs(summaries, "loss", tmp_path / "new" / "folder" / "loss.png")
    assert path == tmp_path / "new" / "folder" / "loss.png"
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_table_lists_every_run_with_its_values(store):
    uri, _ = store
    table = format_table(compare_runs(EXPERIMENT, tracking_uri=uri), "loss")
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    for label in ORDER:
        assert label in text
    assert "loss (lower is better)" in text and "final" in text and "best" in text
    assert "1.625" in text and "cosine_decay(0.01, 100)" in text
    assert text.index(ORDER[0]) < text.index(ORDER[1]) < text.index(ORDER[2])


def test_cli_prints_the_table_and_writes_the_chart(store, tmp_path):
    uri, _ = store
    chart = tmp_path / "charts" / "loss.png"
    result = invoke("--tracking-uri", uri, "--output", str(chart))
    assert result.exit_code == 0, result.output
    for label in ORDER:
        assert label in result.stdout
    assert f"Chart: {chart}" in result.stdout
    assert chart.read_bytes()[:8] == PNG_MAGIC


def test_cli_json_reads_uri_and_experiment_from_the_environment(store):
    uri, ids = store
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": EXPERIMENT}
    result = invoke("--json", env=env)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["label"] for row in rows] == ORDER
    assert all("history" not in row for row in rows)
    assert rows[1] | {"run_id": None} == {
        "run_id": None,
        "run_name": ORDER[1],
        "label": ORDER[1],
        "status": "FINISHED",
        "optimizer": "adamw",
        "learning_rate": "0.0003",
        "steps": 100,
        "final": 1.625,
        "best": 1.0,
        "tokens_per_second": 1500.0,  # the median of 1000 and 2000
        "flops_per_second": None,  # these runs logged no cost figures
        "mfu": None,
        "compile_seconds": None,
        "group": ORDER[1],  # no group param: the optimizer's label
        "seed": None,
        "tokens_per_step": None,
        "flops_per_step": None,
    }
    assert rows[1]["run_id"] == ids[ORDER[1]]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--experiment", "nope"], "'nope'"),
        (["--log-artifact"], "--parent"),
        (["--parent", "0" * 32], "0" * 32),
        (["--output", "chart.svg"], "chart.svg"),
        (["--metric", "no_such_metric", "--output", "x.png"], "no_such_metric"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(store, args, message):
    uri, _ = store
    result = invoke("--tracking-uri", uri, *args)
    assert result.exit_code == 2, result.output
    assert message in one_error_line(result)


def test_cli_logs_the_chart_to_the_parent_run(fresh_store):
    uri, ids = fresh_store
    result = invoke("--tracking-uri", uri, "--parent", ids["parent"], "--log-artifact")
    assert result.exit_code == 0, result.output
    assert f"Logged charts/loss.png to run {ids['parent']}" in result.stdout
    artifacts = MlflowClient(uri).list_artifacts(ids["parent"], "charts")
    assert [a.path for a in artifacts] == ["charts/loss.png"]


@pytest.mark.slow
def test_against_a_real_tracking_server(mlflow_server, tmp_path):
    # The server is shared by the session: a name of its own keeps other tests' runs out.
    name = f"compare-{uuid.uuid4().hex[:8]}"
    ids = populate(mlflow_server.uri, experiment_name=name)
    check_summaries(compare_runs(name, tracking_uri=mlflow_server.uri), ids)

    chart = tmp_path / "loss.png"
    result = invoke(
        "--tracking-uri",
        mlflow_server.uri,
        "--experiment",
        name,
        "--parent",
        ids["parent"],
        "--output",
        str(chart),
        "--log-artifact",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert [row["label"] for row in json.loads(result.stdout)] == ORDER
    assert chart.read_bytes()[:8] == PNG_MAGIC
    artifacts = MlflowClient(mlflow_server.uri).list_artifacts(ids["parent"], "charts")
    assert [a.path for a in artifacts] == ["charts/loss.png"]


@pytest.mark.slow
def test_server_restarts_on_the_same_port_with_its_runs(mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    name = f"restart-{uuid.uuid4().hex[:8]}"
    experiment = client.create_experiment(name)
    port = mlflow_server.port
    try:
        mlflow_server.stop()
        assert not mlflow_server.running and not mlflow_server.healthy()
    finally:
        mlflow_server.start()
    assert mlflow_server.port == port and mlflow_server.healthy()
    assert client.get_experiment_by_name(name).experiment_id == experiment


def test_runs_of_one_name_are_told_apart_and_speed_is_the_median(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment(EXPERIMENT, artifact_location=tmp_path.as_uri())
    speeds = {"adamw": [90.0, 1000.0, 1010.0, 40.0], "sgd": [100.0, 2000.0, 30.0]}
    ids = []
    for name in ("adamw", "adamw", "sgd"):
        run = client.create_run(experiment, run_name=name, tags={"optimizer.label": "optax:x"})
        points = [Metric("tokens_per_second", v, i, i) for i, v in enumerate(speeds[name])]
        client.log_batch(run.info.run_id, metrics=[*points, Metric("loss", 1.0, 0, 3)])
        ids.append(run.info.run_id)
    summaries = compare_runs(EXPERIMENT, tracking_uri=uri)
    by_id = {s.run_id: s for s in summaries}
    assert by_id[ids[0]].tokens_per_second == 545.0  # the median of 4 points, not the last 40
    assert by_id[ids[2]].tokens_per_second == 100.0
    console = Console(width=200, record=True)
    console.print(format_table(summaries, "loss"))
    text = console.export_text()
    assert f"adamw ({ids[0][:8]})" in text and f"adamw ({ids[1][:8]})" in text
    assert "sgd" in text and f"sgd ({ids[2][:8]})" not in text and "optax:x" not in text
