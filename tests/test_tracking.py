"""MLflow tracking read back with MlflowClient: params, tags, artifacts, metrics, statuses."""

import json
import os
import subprocess
import sys
import threading
import time
import types

import keras
import mlflow
import numpy as np
import optax
import pytest
import yaml
from conftest import SEQ_LEN
from mlflow import MlflowClient
from typer.testing import CliRunner

from kithara_ops import Callback, RunConfig, Trainer, data
from kithara_ops.cli import app
from kithara_ops.start import Start, run_info
from kithara_ops.tracking import replay_spool
from kithara_ops.tracking.params import run_params, shorten

FAST = ["--model", "tiny", "--data", "synthetic", "--seq-len", "32", "--batch-size", "8"]
KERAS_SPEC = (
    "keras.optimizers.AdamW(keras.optimizers.schedules.CosineDecay(0.0, 20, "
    "warmup_target=0.003, warmup_steps=4), weight_decay=0.01, global_clipnorm=1.0)"
)
OPTAX_SPEC = (
    "optax.chain(optax.clip_by_global_norm(1.0), "
    "optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 0.003, 4, 24), weight_decay=0.01))"
)
OPTIMIZER_KEYS = {
    "optimizer.family",
    "optimizer.name",
    "optimizer.learning_rate",
    "optimizer.b1",
    "optimizer.b2",
    "optimizer.eps",
    "optimizer.weight_decay",
    "optimizer.clipping",
    "optimizer.chain",
    "optimizer.chain.0",
    "optimizer.chain.1",
    "optimizer.spec",
}


def train_cli(*args):
    result = CliRunner().invoke(app, ["train", *FAST, "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def history(client, run_id, key):
    return [
        (m.step, m.value)
        for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    ]


def check_two_families(uri, experiment):
    """Train a Keras-AdamW run and an Optax-chain run into ``experiment`` and check both."""
    runs = {}
    for family, spec in (("keras", KERAS_SPEC), ("optax", OPTAX_SPEC)):
        result = train_cli(
            "--optimizer",
            spec,
            "--steps",
            "24",
            "--log-every",
            "4",
            "--tracking-uri",
            uri,
            "--experiment",
            experiment,
            "--no-system-metrics",
        )
        runs[family] = result["run_id"]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    keras_run, optax_run = (client.get_run(runs[f]) for f in ("keras", "optax"))
    for family, run in (("keras", keras_run), ("optax", optax_run)):
        params, tags = run.data.params, run.data.tags
        assert run.info.status == "FINISHED"
        assert set(params) >= OPTIMIZER_KEYS
        assert params["optimizer.family"] == family and tags["optimizer.family"] == family
        assert params["optimizer.name"] == "adamw"
        assert params["optimizer.weight_decay"] == "0.01"
        assert params["optimizer.clipping"] == "global_norm=1.0"
        assert params["optimizer.chain.0"] == "clip_by_global_norm(max_norm=1.0)"
        assert params["steps"] == "24" and params["batch_size"] == "8" and params["seq_len"] == "32"
        assert params["model"] == "tiny" and params["sharding"] == "dp"
        assert int(params["num_params"]) > 1_000_000
        assert run.info.run_name == tags["optimizer.label"]
        assert tags["optimizer.label"].startswith(f"{family}:clip+adamw")
        assert {"kithara_ops.version", "jax.backend", "jax.device_count"} <= set(tags)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "optimizer")}
        artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, "config")}
        assert artifacts == {"optimizer/optimizer.json", "config/run.yaml"}
        loss = history(client, run.info.run_id, "loss")
        assert [s for s, _ in loss] == [4, 8, 12, 16, 20, 24]
        assert loss[-1][1] < loss[0][1]
        for key in (
            "grad_norm",
            "update_norm",
            "param_norm",
            "tokens_per_second",
            "step_time_seconds",
        ):
            assert len(history(client, run.info.run_id, key)) == 6, key
    assert set(keras_run.data.params) == set(optax_run.data.params)
    # The learning rate logged is the schedule's value at the step that used it.
    keras_schedule = keras.optimizers.schedules.CosineDecay(
        0.0, 20, warmup_target=3e-3, warmup_steps=4
    )
    optax_schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 4, 24)
    for run_id, schedule in ((runs["keras"], keras_schedule), (runs["optax"], optax_schedule)):
        lrs = history(client, run_id, "learning_rate")
        assert [s for s, _ in lrs] == [4, 8, 12, 16, 20, 24]
        np.testing.assert_allclose(
            [v for _, v in lrs], [float(schedule(s - 1)) for s, _ in lrs], rtol=1e-5
        )
    # config/run.yaml is the resolved config, loadable as one.
    path = client.download_artifacts(runs["optax"], "config/run.yaml")
    with open(path) as f:
        assert RunConfig.from_dict(yaml.safe_load(f)).optimizer == OPTAX_SPEC
    return runs


@pytest.mark.slow
def test_keras_and_optax_runs_against_a_real_mlflow_server(mlflow_server):
    check_two_families(mlflow_server.uri, "families-http")


def test_keras_and_optax_runs_in_a_sqlite_store(tmp_path):
    check_two_families(f"sqlite:///{tmp_path}/runs.db", "families-sqlite")


def test_the_default_store_is_sqlite_in_the_working_directory(tmp_path):
    """A real process with no MLflow variables: MLflow's tracking URI is process-wide state."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    done = subprocess.run(
        [sys.executable, "-m", "kithara_ops.cli", "train", *FAST, "--steps", "5", "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    run_id = json.loads(done.stdout.strip().splitlines()[-1])["run_id"]
    assert (tmp_path / "mlflow.db").is_file()
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optimizer.spec"] == "optax.adamw"
    assert run.data.metrics["loss"] > 0


class Outage(Callback):
    """Stops the server at one step and, optionally, starts it again a few steps later."""

    def __init__(self, server, stop_at, restart_at=None):
        self.server, self.stop_at, self.restart_at = server, stop_at, restart_at
        self.restarter = None

    def on_log(self, step, metrics):
        if step == self.stop_at:
            self.server.stop()
        if step == self.restart_at:  # in the background: training goes on meanwhile
            self.restarter = threading.Thread(target=self.server.start)
            self.restarter.start()


@pytest.fixture
def quick_http_failures(monkeypatch):
    """Make each failed request fail in seconds rather than after MLflow's long retries."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")


@pytest.mark.slow
def test_server_down_mid_run_loses_no_metric(mlflow_server, make_model, quick_http_failures):
    batches = data.load("synthetic", seq_len=SEQ_LEN, batch_size=8)
    outage = Outage(mlflow_server, stop_at=10, restart_at=40)
    trainer = Trainer(
        make_model(),
        optax.adam(1e-3),
        batches,
        steps=120,
        log_every=1,
        callbacks=[outage],
        tracking_uri=mlflow_server.uri,
        experiment="outage",
        system_metrics=False,
    )
    try:
        result = trainer.train()
    finally:
        if outage.restarter:
            outage.restarter.join()
        mlflow_server.start()
    assert trainer.sinks.tracker.delivery.pending_points == 0
    client = MlflowClient(mlflow_server.uri)
    assert [s for s, _ in history(client, result.run_id, "loss")] == list(range(1, 121))
    assert client.get_run(result.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_server_that_never_returns_spools_then_replays(
    mlflow_server, make_model, quick_http_failures, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    batches = data.load("synthetic", seq_len=SEQ_LEN, batch_size=8)
    trainer = Trainer(
        make_model(),
        optax.adam(1e-3),
        batches,
        steps=30,
        log_every=1,
        callbacks=[Outage(mlflow_server, stop_at=5)],
        tracking_uri=mlflow_server.uri,
        experiment="never-returns",
        system_metrics=False,
    )
    trainer.sinks.tracker.flush_timeout = 3.0
    try:
        started = time.monotonic()
        result = trainer.train()
        assert time.monotonic() - started < 120
    finally:
        mlflow_server.start()
    delivery = trainer.sinks.tracker.delivery
    assert result.step == 30 and result.run_id is not None
    assert delivery.pending_points > 0 and delivery.spool.is_file()
    assert delivery.spool.parent == tmp_path / "mlflow-spool"
    replay_spool(delivery.spool)
    client = MlflowClient(mlflow_server.uri)
    assert [s for s, _ in history(client, result.run_id, "loss")] == list(range(1, 31))
    assert client.get_run(result.run_id).info.status == "FINISHED"


def test_unreachable_server_never_fails_training(
    make_model, quick_http_failures, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    batches = data.load("synthetic", seq_len=SEQ_LEN, batch_size=8)
    trainer = Trainer(
        make_model(),
        optax.adam(1e-3),
        batches,
        steps=3,
        log_every=1,
        tracking_uri="http://127.0.0.1:9",
        system_metrics=False,
    )
    trainer.sinks.tracker.flush_timeout = 2.0
    result = trainer.train()
    assert result.step == 3 and result.run_id is None
    spool = trainer.sinks.tracker.delivery.spool
    lines = [json.loads(line) for line in spool.read_text().splitlines()]
    assert lines[0]["kind"] == "run" and lines[0]["payload"]["run_id"] is None
    kinds = {r["kind"] for r in lines[1:]}
    assert {"params", "tags", "text", "metrics", "end"} <= kinds
    steps = sorted({p[3] for r in lines if r["kind"] == "metrics" for p in r["payload"]})
    assert steps == [1, 2, 3]


class Boom(Callback):
    def __init__(self, error):
        self.error = error

    def on_step(self, record):
        if record.step == 2:
            raise self.error


@pytest.mark.parametrize(
    ("error", "status"), [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")]
)
def test_run_status_on_failure_and_interrupt(make_model, error, status):
    batches = data.load("synthetic", seq_len=SEQ_LEN, batch_size=8)
    trainer = Trainer(
        make_model(),
        optax.adam(1e-3),
        batches,
        steps=5,
        callbacks=[Boom(error)],
        experiment="statuses",
        system_metrics=False,
    )
    with pytest.raises(type(error)):
        trainer.train()
    run = MlflowClient().get_run(trainer.sinks.tracker.run_id)
    assert run.info.status == status


def test_log_model_gives_the_model_back_and_system_metrics_are_logged(make_model, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    batches = data.load("synthetic", seq_len=SEQ_LEN, batch_size=8)

    class Slow(Callback):  # long enough for a couple of system-metric samples
        def on_step(self, record):
            time.sleep(0.3)

    model = make_model()
    trainer = Trainer(
        model,
        optax.adam(1e-3),
        batches,
        steps=8,
        log_model=True,
        experiment="model",
        callbacks=[Slow()],
    )
    result = trainer.train()
    loaded = mlflow.keras.load_model(f"runs:/{result.run_id}/model")
    x = np.arange(2 * SEQ_LEN, dtype=np.int32).reshape(2, SEQ_LEN) % 200
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-5)
    metrics = MlflowClient().get_run(result.run_id).data.metrics
    assert any(key.startswith("system/") for key in metrics), sorted(metrics)


def test_long_values_are_shortened_never_refused(make_model):
    assert shorten("x" * 7000, 6000) == "x" * 5997 + "..."
    trainer = Trainer(make_model(), optax.adam(1e-3), [], steps=1, tracking=False, data="d" * 7000)
    progress = types.SimpleNamespace(placed={})
    info = run_info(trainer.program, Start(trainer.initial_state(), "uid"), 1, progress, [])
    params = run_params(info, {"optimizer.chain": "c" * 9000})
    assert all(len(v) <= 6000 for v in params.values())
    assert params["data"].endswith("...")


def test_credentials_in_the_tracking_uri_are_masked_and_handed_to_mlflow(monkeypatch):
    from mlflow.utils.credentials import get_default_host_creds

    from kithara_ops.config import RunConfig
    from kithara_ops.config.credentials import masked

    assert masked("https://bob:s3cret@mlflow.example.com:5000/api") == (
        "https://bob:***@mlflow.example.com:5000/api"
    )
    assert masked("https://t0ken@mlflow.example.com") == "https://***@mlflow.example.com"
    assert masked("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    config = RunConfig(tracking_uri="http://alice:s%40cr3t@127.0.0.1:5000")
    assert config.tracking_uri == "http://127.0.0.1:5000"
    # What MLflow's REST client sends: HTTP basic auth with the decoded credentials.
    creds = get_default_host_creds(config.tracking_uri)
    assert (creds.host, creds.username, creds.password) == (config.tracking_uri, "alice", "s@cr3t")
