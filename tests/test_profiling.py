"""The profiler window: a JAX trace of the chosen steps and the compiled step's HLO and cost
analysis, logged once under ``profile/`` in the run's MLflow artifacts."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from kithara_ops.cli import app
from kithara_ops.config import RunConfig
from kithara_ops.errors import ConfigError

RUN = ["train", "--model", "tiny", "--data", "synthetic", "--seq-len", "16", "--batch-size",
       "4", "--steps", "6", "--no-system-metrics", "--json", "--quiet"]  # fmt: skip


def files(client, run_id, path="profile"):
    out = {}
    for item in client.list_artifacts(run_id, path):
        out.update(files(client, run_id, item.path) if item.is_dir else {item.path: item})
    return out


def trained(tmp_path, window):
    uri = f"sqlite:///{tmp_path}/runs.db"
    done = CliRunner().invoke(app, [*RUN, "--profile-steps", window, "--tracking-uri", uri])
    assert done.exit_code == 0, done.output
    run_id = json.loads(done.stdout.strip().splitlines()[-1])["run_id"]
    return MlflowClient(uri), run_id, done


def test_a_window_of_steps_is_traced_and_logged_with_the_steps_hlo_once(tmp_path):
    client, run_id, done = trained(tmp_path, "3:4")
    logged = files(client, run_id)
    traces = [p for p in logged if p.endswith(".xplane.pb")]
    assert len(traces) == 1 and traces[0].startswith("profile/plugins/profile/")
    assert logged[traces[0]].file_size > 10_000
    timeline = [p for p in logged if p.endswith(".trace.json.gz")]
    local = Path(client.download_artifacts(run_id, timeline[0], str(tmp_path)))
    events = json.loads(gzip.decompress(local.read_bytes()))["traceEvents"]
    assert any("train_step" in str(e.get("name", "")) for e in events)
    hlo = Path(client.download_artifacts(run_id, "profile/train_step.hlo.txt.gz", str(tmp_path)))
    text = gzip.decompress(hlo.read_bytes()).decode()
    assert text.startswith("HloModule") and "ENTRY" in text
    cost = json.loads(Path(client.download_artifacts(run_id, "profile/train_step.cost.json",
                                                     str(tmp_path))).read_text())  # fmt: skip
    assert cost["flops"] > 1e6
    assert sum(p.endswith("hlo.txt.gz") for p in logged) == 1
    assert client.get_run(run_id).data.params["profile_steps"] == "3:4"
    assert "profile of steps 3:4" in done.stderr


def test_a_window_past_the_last_step_ends_with_the_run_and_one_after_it_traces_nothing(tmp_path):
    client, run_id, _ = trained(tmp_path, "5:9")
    assert any(p.endswith(".xplane.pb") for p in files(client, run_id))
    client, run_id, _ = trained(tmp_path / "later", "7:9")
    assert files(client, run_id) == {}


@pytest.mark.parametrize("window", ["3", "4:2", "0:2", "a:b", "2:"])
def test_a_bad_window_is_refused_in_one_line(window):
    with pytest.raises(ConfigError, match="profile_steps must be START:END"):
        RunConfig(profile_steps=window)
    done = CliRunner().invoke(app, [*RUN, "--profile-steps", window, "--no-tracking"])
    assert done.exit_code == 2 and "profile_steps" in done.stderr
