"""``kithara-ops describe`` and ``kithara-ops ui``: params a run logs, and the MLflow UI server."""

import json
import os
import selectors
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from kithara_ops.cli import app
from kithara_ops.optim.describe import describe_optimizer, optimizer_params
from kithara_ops.optim.spec import build_optimizer
from kithara_ops.tracking import server as server_module
from kithara_ops.tracking.view import SHARED_VIEW_TAG

runner = CliRunner()
OPTAX_CLIP_ADAMW = (
    "optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.01))"
)
KERAS_CLIP_ADAMW = (
    "keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=0.01, global_clipnorm=1.0)"
)
HOSTILE = "__import__('os').system('x')"
FAST = ["--model", "tiny", "--data", "synthetic", "--seq-len", "32", "--batch-size", "8"]
LAUNCH = [sys.executable, "-m", "kithara_ops.cli"]


def run(*args):
    return runner.invoke(app, list(args))


def describe_json(*args):
    result = run("describe", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def one_error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


def chart_url(port, experiment_id, uri):
    """The comparison page on ``port``: the chart view loading the one shared view in ``uri``."""
    tags = MlflowClient(uri).get_experiment(experiment_id).tags
    keys = [k.removeprefix(SHARED_VIEW_TAG) for k in tags if k.startswith(SHARED_VIEW_TAG)]
    assert len(keys) == 1, tags
    return (
        f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs"
        f"?viewStateShareKey={keys[0]}&compareRunsMode=CHART"
    )


def mlflow_servers_on(port):
    """Live ``mlflow server`` (or its uvicorn) processes listening on ``port``, by command line."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "--port" in cmdline and str(port) in cmdline and any("mlflow" in a for a in cmdline):
            found.append(proc)
    return found


def _in_session(process, session_id):
    try:
        return os.getsid(process.pid) == session_id
    except OSError:
        return False


def answers(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except OSError:
        return None


@pytest.fixture
def store(tmp_path):
    """A SQLite store in ``tmp_path`` with the experiment ``ui-test``: (uri, experiment id)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    return uri, MlflowClient(uri).create_experiment("ui-test")


# --- describe ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [OPTAX_CLIP_ADAMW, KERAS_CLIP_ADAMW])
def test_describe_json_is_the_description_and_the_params_of_the_optimizer(spec):
    out = describe_json(spec)
    description = describe_optimizer(build_optimizer(spec))
    assert out["params"] == {**optimizer_params(description), "optimizer.spec": spec}
    expected = json.loads(json.dumps(description))
    for found in (out["description"], expected):  # Keras numbers its optimizers' names
        for config in (found.get("config"), found.get("tree", {}).get("config")):
            if isinstance(config, dict):
                config.pop("name", None)
    assert out["description"] == expected


def test_keras_and_optax_clip_adamw_log_the_same_keys():
    optax_params = describe_json(OPTAX_CLIP_ADAMW)["params"]
    keras_params = describe_json(KERAS_CLIP_ADAMW)["params"]
    assert set(optax_params) == set(keras_params)
    assert optax_params["optimizer.family"] == "optax"
    assert keras_params["optimizer.family"] == "keras"
    for key in ("name", "learning_rate", "weight_decay", "clipping"):
        assert optax_params[f"optimizer.{key}"] == keras_params[f"optimizer.{key}"], key


def test_bare_name_takes_learning_rate_and_weight_decay_like_train():
    params = describe_json("optax.sgd", "--learning-rate", "0.1")["params"]
    assert params["optimizer.learning_rate"] == "0.1"
    assert params["optimizer.name"] == "sgd"
    assert params["optimizer.spec"] == "optax.sgd"
    params = describe_json("keras.AdamW", "--weight-decay", "0.05")["params"]
    assert params["optimizer.learning_rate"] == "0.001"  # train's default learning rate
    assert params["optimizer.weight_decay"] == "0.05"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([HOSTILE], "__import__"),
        (["optax.nope"], "optax.nope"),
        (["optax.sgd", "--weight-decay", "0.1"], "weight_decay"),
        (["optax.adamw", "--learning-rate", "-1"], "learning_rate"),
    ],
)
def test_describe_refuses_a_bad_spec_with_one_line_and_exit_2(args, message):
    result = run("describe", *args)
    assert result.exit_code == 2, result.output
    assert message in one_error_line(result)
    assert result.stdout == ""


def test_describe_prints_a_header_and_every_param():
    result = run("describe", OPTAX_CLIP_ADAMW)
    assert result.exit_code == 0, result.output
    header = dict(line.split(":", 1) for line in result.stdout.splitlines()[:6] if ":" in line)
    assert header["family"].strip() == "optax"
    assert header["name"].strip() == "adamw"
    assert header["label"].strip() == "optax:clip+adamw lr=1e-3"
    assert header["learning rate"].strip() == "0.001"
    assert header["clipping"].strip() == "global_norm=1.0"
    assert header["chain"].strip().startswith("clip_by_global_norm(max_norm=1.0) -> adamw(")
    params = describe_json(OPTAX_CLIP_ADAMW)["params"]
    for key, value in params.items():  # piped: one row per param, never wrapped
        assert any(key in line and value in line for line in result.stdout.splitlines()), key


def tracked_run(spec, tmp_path):
    """The MLflow run of a 2-step ``train`` with optimizer ``spec``, in a sqlite store."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = run(
        "train", *FAST, "--steps", "2", "--optimizer", spec, "--tracking-uri", uri,
        "--no-system-metrics", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    run_id = json.loads(result.stdout.strip().splitlines()[-1])["run_id"]
    return MlflowClient(uri).get_run(run_id)


@pytest.mark.parametrize(
    "spec", [OPTAX_CLIP_ADAMW, pytest.param(KERAS_CLIP_ADAMW, marks=pytest.mark.slow)]
)
def test_describe_prints_the_params_a_training_run_logs(spec, tmp_path):
    logged = tracked_run(spec, tmp_path).data.params
    logged = {k: v for k, v in logged.items() if k.startswith("optimizer.")}
    assert logged == describe_json(spec)["params"]


MONITORED = (
    "optax.MultiSteps(optax.chain(optax.clip_by_global_norm(1.0), optax.contrib.prodigy()), 2)"
)


def test_describe_names_the_step_metrics_a_training_run_logs(tmp_path):
    shown = run("describe", MONITORED)
    assert "clipped, optax.gradient_step, optax.mini_step, optim.d" in shown.stdout
    logged = tracked_run(MONITORED, tmp_path).data.metrics
    own = {key for key in logged if key == "clipped" or key.startswith(("optax.", "optim."))}
    assert own == set(describe_json(MONITORED)["metrics"])


# --- ui ---------------------------------------------------------------------------------


def test_ui_print_url_names_the_experiment_and_starts_nothing(store, monkeypatch):
    uri, experiment_id = store

    def refuse(*args, **kwargs):
        raise AssertionError("--print-url started a server")

    monkeypatch.setattr(server_module.LocalServer, "start", refuse)
    result = run("ui", "--tracking-uri", uri, "--experiment", "ui-test", "--print-url")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().startswith("MLflow UI: http://127.0.0.1:")
    result = run(
        "ui", "--tracking-uri", uri, "--experiment", "ui-test", "--port", "5123", "--print-url"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"MLflow UI: {chart_url(5123, experiment_id, uri)}"


def test_ui_experiment_comes_from_the_environment(store, monkeypatch):
    uri, experiment_id = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "ui-test")
    result = run("ui", "--port", "5124", "--print-url")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"MLflow UI: {chart_url(5124, experiment_id, uri)}"


def test_ui_unknown_experiment_is_one_line_naming_it_and_the_existing_ones(store):
    uri, _ = store
    result = run("ui", "--tracking-uri", uri, "--experiment", "no-such-exp", "--print-url")
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert "'no-such-exp'" in line and "'ui-test'" in line


@pytest.mark.parametrize("uri", ["sqlite:///{tmp}/absent.db", "{tmp}/no-such-folder"])
def test_ui_store_that_does_not_exist_is_refused_and_not_created(uri, tmp_path):
    uri = uri.format(tmp=tmp_path)
    result = run("ui", "--tracking-uri", uri, "--print-url")
    assert result.exit_code == 2, result.output
    assert "No MLflow store" in one_error_line(result)
    assert list(tmp_path.iterdir()) == []


def test_ui_busy_port_is_a_usage_error(store):
    import socket

    uri, _ = store
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("ui", "--tracking-uri", uri, "--experiment", "ui-test", "--port", str(port))
    assert result.exit_code == 2, result.output
    assert f"Port {port}" in one_error_line(result)


def test_help_of_both_commands_shows_examples():
    for command, example in [
        ("describe", "kithara-ops describe optax.adamw"),
        ("ui", "kithara-ops ui --experiment sweep"),
    ]:
        result = run(command, "--help")
        assert result.exit_code == 0, result.output
        assert "Examples" in result.stdout and example in result.stdout, result.stdout


@pytest.mark.slow
def test_ui_serves_the_chart_view_and_stops_its_server_on_sigterm(store, tmp_path):
    uri, experiment_id = store
    with open(tmp_path / "ui.err", "wb") as err:
        proc = subprocess.Popen(
            [*LAUNCH, "ui", "--tracking-uri", uri, "--experiment", "ui-test"],
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=tmp_path,
            start_new_session=True,
        )
    port = None
    try:
        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ)
        url, deadline = None, time.monotonic() + 90
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            if selector.select(timeout=1):
                line = proc.stdout.readline().decode()
                if line.startswith("MLflow UI: "):
                    url = line.removeprefix("MLflow UI: ").strip()
        assert url is not None, (tmp_path / "ui.err").read_text()
        port = int(url.removeprefix("http://127.0.0.1:").split("/", 1)[0])
        assert url == chart_url(port, experiment_id, uri)
        assert answers(f"http://127.0.0.1:{port}/health") == 200
        servers = mlflow_servers_on(port)
        assert servers
        # Viewing runs needs no server-side job workers (MLflow's huey consumers).
        session = os.getsid(servers[0].pid)
        group = [p for p in psutil.process_iter(["cmdline"]) if _in_session(p, session)]
        assert group and not any("huey" in " ".join(p.info["cmdline"] or []) for p in group)

        proc.send_signal(signal.SIGTERM)  # the ui process only, not its group
        assert proc.wait(timeout=20) == 0, (tmp_path / "ui.err").read_text()
        assert answers(f"http://127.0.0.1:{port}/health") is None
        assert mlflow_servers_on(port) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for leftover in mlflow_servers_on(port) if port else []:
            leftover.kill()
        proc.stdout.close()


@pytest.mark.slow
def test_ui_on_a_tracking_server_prints_its_chart_url_and_starts_nothing(
    mlflow_server, monkeypatch
):
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("ui-remote")
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment("ui-remote")
    )

    def refuse(*args, **kwargs):
        raise AssertionError("ui started a server for an http tracking URI")

    monkeypatch.setattr(server_module.LocalServer, "start", refuse)
    result = run("ui", "--tracking-uri", mlflow_server.uri, "--experiment", "ui-remote")
    assert result.exit_code == 0, result.output
    assert (
        result.stdout.strip()
        == f"MLflow UI: {chart_url(mlflow_server.port, experiment_id, mlflow_server.uri)}"
    )
    result = run("ui", "--tracking-uri", mlflow_server.uri, "--experiment", "nope-remote")
    assert result.exit_code == 2, result.output
    assert "'nope-remote'" in one_error_line(result)


# Run in a fresh interpreter: in this one, other tests may have imported JAX and Keras already.
# MLflow's client is imported before the clock starts: no MLflow client does without it.
QUICK_UI = """
import sys, time
import mlflow.tracking
from typer.testing import CliRunner
from kithara_ops.cli import app
start = time.monotonic()
result = CliRunner().invoke(app, ["ui", "--tracking-uri", sys.argv[1], "--experiment", "ui-quick"])
print(result.exit_code, round(time.monotonic() - start, 2), "jax" in sys.modules,
      "keras" in sys.modules, result.stdout.strip())
"""


def test_ui_on_a_tracking_server_prints_its_url_within_two_seconds(mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    if client.get_experiment_by_name("ui-quick") is None:
        client.create_experiment("ui-quick")
    done = subprocess.run(
        [sys.executable, "-c", QUICK_UI, mlflow_server.uri],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    code, seconds, jax, keras, url = done.stdout.split(maxsplit=4)
    assert code == "0" and url.startswith("MLflow UI: http://"), done.stdout
    # Printing a page's address needs neither JAX nor Keras, whose imports took seconds.
    assert (jax, keras) == ("False", "False")
    assert float(seconds) < 2.0, done.stdout
