"""Config files, --print-config, hostile specs through the CLI, --help, and sweeps."""

import json

import jax
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from test_spec import REFUSED
from typer.testing import CliRunner

from kithara_ops.checkpoint.checkpointer import Checkpointer
from kithara_ops.cli import app
from kithara_ops.tracking.compare import _figure, compare_runs

runner = CliRunner()
FAST = ["--model", "tiny", "--data", "synthetic", "--seq-len", "32", "--batch-size", "8"]


def invoke(*args):
    return runner.invoke(app, list(args))


def final_params(checkpoint_dir):
    """The parameters of a directory's newest checkpoint, as numpy arrays."""
    checkpointer = Checkpointer(checkpoint_dir)
    step = checkpointer.steps()[-1]
    metadata = checkpointer.saved_structure(step)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata
    )
    state = checkpointer.restore(step, abstract)
    return {k: np.asarray(v) for k, v in state["params"].items()}


def test_a_runs_logged_config_reproduces_it(tmp_path):
    uri = f"sqlite:///{tmp_path}/runs.db"
    first = invoke("train", *FAST, "--steps", "6", "--seed", "3", "--learning-rate", "0.003",
                   "--optimizer", "optax.chain(optax.clip(0.5), optax.adam(0.002))",
                   "--checkpoint-dir", str(tmp_path / "a"), "--tracking-uri", uri,
                   "--no-system-metrics", "--json")  # fmt: skip
    assert first.exit_code == 0, first.output
    run_id = json.loads(first.stdout.strip().splitlines()[-1])["run_id"]
    logged = MlflowClient(uri).download_artifacts(run_id, "config/run.yaml", str(tmp_path))
    second = invoke("train", "--config", logged, "--checkpoint-dir", str(tmp_path / "b"),
                    "--json")  # fmt: skip
    assert second.exit_code == 0, second.output
    a, b = final_params(tmp_path / "a"), final_params(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_run(run_id).info.experiment_id])
    params = [r.data.params for r in runs]
    assert len(runs) == 2 and params[0]["optimizer.spec"] == params[1]["optimizer.spec"]
    assert params[0]["seed"] == params[1]["seed"] == "3"


def test_print_config_merges_file_and_options(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "tiny"\nsteps = 50\nlearning_rate = 3e-4\nsharding = "fsdp"\n')
    result = invoke(
        "train", "--config", str(path), "--steps", "9", "--no-tracking", "--print-config"
    )
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    assert printed["steps"] == 9 and printed["learning_rate"] == 3e-4
    assert printed["sharding"] == "fsdp" and printed["tracking"] is False
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(result.stdout)
    again = yaml.safe_load(invoke("train", "--config", str(yaml_file), "--print-config").stdout)
    assert again == printed


@pytest.mark.parametrize("args", [["--config", "missing.yaml"], ["--config", "bad.yaml"]])
def test_bad_config_file_is_a_usage_error(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("steps: 10\nbatch_sise: 4\n")
    result = invoke("train", *args, "--print-config")
    assert result.exit_code == 2
    assert (
        result.stderr.strip().count("\n") == 0 and args[1] in result.stderr
    ) or "batch_size" in result.stderr


@pytest.mark.parametrize(("spec", "fragments"), REFUSED, ids=[repr(s)[:50] for s, _ in REFUSED])
def test_hostile_specs_through_the_cli_exit_2_with_a_precise_line(spec, fragments):
    result = invoke("train", *FAST, "--steps", "1", "--no-tracking", "--optimizer", spec)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output


def test_every_command_has_help_with_examples():
    import typer

    commands = typer.main.get_command(app).commands
    assert {"train", "resume", "sweep", "compare", "checkpoints"} <= set(commands)
    for name in commands:
        result = invoke(name, "--help")
        assert result.exit_code == 0, name
        assert "Example" in result.stdout, name


def test_sweep_refuses_bad_input_before_any_run(tmp_path):
    uri = f"sqlite:///{tmp_path}/runs.db"
    one = invoke("sweep", "--optimizer", "optax.adam(1e-3)", "--tracking-uri", uri)
    assert one.exit_code == 2 and "at least two" in one.stderr
    bad = invoke("sweep", "--optimizer", "optax.adam(1e-3)", "--optimizer", "open('x')",
                 "--tracking-uri", uri)  # fmt: skip
    assert bad.exit_code == 2 and "open" in bad.stderr
    typo = invoke("sweep", "--optimizer", "optax.adam(1e-3)", "--optimizer", "optax.sgd(0.1)",
                  "--stesp", "3", "--tracking-uri", uri)  # fmt: skip
    assert typo.exit_code == 2 and "--stesp" in typo.stderr
    assert not MlflowClient(uri).search_runs(
        [e.experiment_id for e in MlflowClient(uri).search_experiments()]
    )


@pytest.mark.slow
def test_sweep_of_three_optimizers_against_a_real_server(mlflow_server, tmp_path):
    specs = ["optax.adamw(0.003)", "keras.AdamW(0.003)", "optax.lion(0.0003)"]
    args = ["sweep", *[a for s in specs for a in ("--optimizer", s)], *FAST, "--steps", "12",
            "--log-every", "3", "--no-system-metrics", "--experiment", "sweep-http",
            "--tracking-uri", mlflow_server.uri, "--parallel", "2", "--json"]  # fmt: skip
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    parent_id = json.loads(result.stdout.strip().splitlines()[-1])["parent_run_id"]
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("sweep-http")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    parent = client.get_run(parent_id)
    assert len(runs) == 4 and len(children) == 3
    assert parent.info.status == "FINISHED"
    assert all(c.info.status == "FINISHED" for c in children)
    assert sorted(c.data.params["optimizer.spec"] for c in children) == sorted(specs)
    # The children's params differ exactly in the optimizer's fields (and the group, which
    # is the optimizer's label).
    keys = set.union(*(set(c.data.params) for c in children))
    differing = {k for k in keys if len({c.data.params.get(k) for c in children}) > 1}
    assert "group" in differing, differing
    assert all(k.startswith("optimizer.") or k == "group" for k in differing), differing
    assert {c.data.params["group"] for c in children} == {
        c.data.tags["optimizer.label"] for c in children
    }
    # compare draws one line per child run.
    summaries = compare_runs("sweep-http", tracking_uri=mlflow_server.uri, parent_run_id=parent_id)
    assert len(_figure(summaries, "loss").axes[0].get_lines()) == 3
    chart = tmp_path / "loss.png"
    drawn = invoke("compare", "--experiment", "sweep-http", "--tracking-uri", mlflow_server.uri,
                   "--parent", parent_id, "--output", str(chart))  # fmt: skip
    assert drawn.exit_code == 0, drawn.output
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
