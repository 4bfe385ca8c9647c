"""A team tracking server: ``mlflow server`` on PostgreSQL, artifacts served by the server.

The same set-up as ``deploy/tracking-server`` on one machine: a private PostgreSQL cluster, an
``mlflow server`` on it, and a real ``kithara-ops sweep`` whose three runs train in parallel
processes and log every step. Every point must arrive once, and be in PostgreSQL itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psycopg2
import pytest
from mlflow import MlflowClient
from mlflow_server import MlflowServer

pytestmark = pytest.mark.slow

SPECS = ["optax.adamw(0.003)", "keras.AdamW(0.003)", "optax.lion(0.0003)"]
STEPS = 20
EXPERIMENT = "team"
FAST = ["--model", "tiny", "--data", "synthetic", "--seq-len", "32", "--batch-size", "8"]


@pytest.fixture
def team_server(postgres_server, tmp_path):
    """``mlflow server`` on 127.0.0.1 with the PostgreSQL store, serving its artifacts."""
    server = MlflowServer(
        tmp_path / "mlflow", backend_store_uri=postgres_server.uri, serve_artifacts=True
    )
    try:
        server.start()
    except RuntimeError as err:
        pytest.fail(str(err), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


def test_a_parallel_sweep_lands_every_point_in_postgres(postgres_server, team_server, tmp_path):
    args = ["sweep", *[a for s in SPECS for a in ("--optimizer", s)], "--parallel", "3",
            *FAST, "--steps", str(STEPS), "--log-every", "1", "--no-system-metrics",
            "--experiment", EXPERIMENT, "--tracking-uri", team_server.uri, "--json"]  # fmt: skip
    # One device per process: three trainings share the machine's cores.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    done = subprocess.run(
        [sys.executable, "-m", "kithara_ops.cli", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr + team_server.log_tail()
    parent_id = json.loads(done.stdout.strip().splitlines()[-1])["parent_run_id"]

    client = MlflowClient(team_server.uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # sent via the server
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert len(runs) == 4 and len(children) == 3
    assert all(r.info.status == "FINISHED" for r in runs)
    assert sorted(c.data.params["optimizer.spec"] for c in children) == sorted(SPECS)
    for child in children:
        run_id = child.info.run_id
        for key in ("loss", "learning_rate"):
            steps = [m.step for m in client.get_metric_history(run_id, key)]
            assert sorted(steps) == list(range(1, STEPS + 1)), (key, steps)
        # The run's files went through the server to its artifact folder.
        logged = {a.path for a in client.list_artifacts(run_id, "config")}
        assert logged == {"config/run.yaml"}
        on_disk = team_server.artifact_root / experiment.experiment_id / run_id / "artifacts"
        assert (on_disk / "config" / "run.yaml").is_file()

    # The same facts, read from PostgreSQL's tables rather than through MLflow.
    run_ids = [c.info.run_id for c in children]
    with psycopg2.connect(postgres_server.uri) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT run_uuid, status FROM runs")
        assert dict(cursor.fetchall()) == {r.info.run_id: "FINISHED" for r in runs}
        for key in ("loss", "learning_rate"):
            cursor.execute(
                "SELECT run_uuid, count(*), count(DISTINCT step), min(step), max(step)"
                " FROM metrics WHERE key = %s GROUP BY run_uuid",
                (key,),
            )
            counts = {row[0]: row[1:] for row in cursor.fetchall()}
            assert counts == {run_id: (STEPS, STEPS, 1, STEPS) for run_id in run_ids}, key
        cursor.execute("SELECT count(*) FROM metrics WHERE key = 'loss'")
        assert cursor.fetchone()[0] == len(SPECS) * STEPS
    connection.close()


def test_two_sweeps_fill_one_postgres_study_under_one_parent(
    postgres_server, team_server, tmp_path
):
    """Two processes, as on two machines: the Optuna study in PostgreSQL, runs via the server."""
    from test_search import check_shared_search, two_sweeps

    storage = postgres_server.create_database("optuna")
    printed = two_sweeps(storage, team_server.uri, tmp_path, trials=3)
    check_shared_search(MlflowClient(team_server.uri), printed, trials=3)
    with psycopg2.connect(storage) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT number, state FROM trials JOIN studies USING (study_id) "
                       "WHERE study_name LIKE '%/optax:adamw' AND number < 3")  # fmt: skip
        rows = cursor.fetchall()
    assert sorted(n for n, _ in rows) == [0, 1, 2]
    assert {state for _, state in rows} <= {"COMPLETE", "PRUNED"}
