"""A seeded sweep, trained once, and what ``compare --group`` concludes from it."""

import csv
import html
import io
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from scipy import stats
from test_ui_browser import browser
from typer.testing import CliRunner

from kithara_ops.cli import app
from kithara_ops.tracking.compare import compare_runs
from kithara_ops.tracking.groups import group_statistics
from kithara_ops.tracking.report import COLUMNS, REPORT_ARTIFACT

runner = CliRunner()
SGD, ADAMW = "optax.sgd(1e-5)", "optax.adamw(1e-3)"
# adamw written as its parts: the same optimizer, so the same numbers on every seed.
CHAIN = "optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-4), optax.scale(-1e-3))"
SEEDS = [0, 1, 2]
EXPERIMENT = "seeded"


def invoke(*args):
    return runner.invoke(app, list(args))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """sgd, adamw and adamw as a chain, 3 seeds each, trained one after another in-process."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('seeded')}/runs.db"
    args = ["sweep", "--optimizer", SGD, "--optimizer", ADAMW, "--optimizer", CHAIN,
            "--seeds", "0,1,2", "--model", "tiny", "--data", "synthetic", "--seq-len", "32",
            "--batch-size", "8", "--steps", "8", "--log-every", "4", "--no-system-metrics",
            "--experiment", EXPERIMENT, "--tracking-uri", uri, "--json"]  # fmt: skip
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return uri, json.loads(result.stdout.strip().splitlines()[-1])


def final_losses(client, runs):
    """Each run's logged loss at its last step, read back from MLflow."""
    out = {}
    for found in runs:
        history = client.get_metric_history(found.info.run_id, "loss")
        out[(found.data.params["group"], int(found.data.params["seed"]))] = max(
            history, key=lambda point: point.step
        ).value
    return out


def report_rows(page):
    """The report's statistics table: ``{group: {column: value}}``, values as the cells'
    ``data-value`` JSON."""
    table = page.split("<table id='statistics'>", 1)[1].split("</table>", 1)[0]
    out = {}
    for group, row in re.findall(r'<tr data-group="([^"]*)">(.*?)</tr>', table, flags=re.S):
        values = [json.loads(html.unescape(v)) for v in re.findall(r'data-value="([^"]*)"', row)]
        out[html.unescape(group)] = dict(zip([key for key, _ in COLUMNS], values, strict=True))
    return out


def same(a, b):
    """Equal, numbers (and lists of them) to 1e-12 relative."""
    if isinstance(a, float) or (isinstance(a, list) and a and isinstance(a[0], float)):
        return a == pytest.approx(b, rel=1e-12)
    return a == b


@pytest.mark.slow
def test_every_optimizer_trains_once_per_seed_and_runs_pair_by_seed(sweep):
    uri, printed = sweep
    client = MlflowClient(uri)
    parent = client.get_run(printed["parent_run_id"])
    assert parent.data.params["sweep.seeds"] == "0,1,2"
    assert parent.info.run_name == "sweep of 3 optimizers x 3 seeds"
    groups = [parent.data.params[f"sweep.group.{i}"] for i in range(3)]
    # adamw and its chain share a label, so each is grouped by its spec; sgd by its label.
    assert groups == ["optax:sgd lr=1e-5", ADAMW, CHAIN]
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted((c.data.params["group"], int(c.data.params["seed"])) for c in children) == sorted(
        (g, s) for g in groups for s in SEEDS
    )
    assert {c.info.run_name for c in children} == {f"{g} seed {s}" for g in groups for s in SEEDS}
    # One seed: the same initial weights and batches for every optimizer, so the first
    # logged loss (step 4) differs between seeds but its starting point does not between
    # the two ways of writing adamw.
    finals = final_losses(client, children)
    for seed in SEEDS:
        assert finals[(ADAMW, seed)] == pytest.approx(finals[(CHAIN, seed)], rel=1e-5)
    assert len({round(finals[(ADAMW, s)], 6) for s in SEEDS}) == 3
    # Best-value metrics are logged as the run goes.
    for child in children:
        losses = [p.value for p in client.get_metric_history(child.info.run_id, "loss")]
        assert child.data.metrics["best_loss"] == pytest.approx(min(losses))
        assert child.data.metrics["best_step"] in (4.0, 8.0)


@pytest.mark.slow
def test_compare_group_json_is_scipy_on_the_logged_values(sweep):
    uri, printed = sweep
    parent_id = printed["parent_run_id"]
    result = invoke("compare", "--experiment", EXPERIMENT, "--tracking-uri", uri,
                    "--parent", parent_id, "--group", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = {row["group"]: row for row in json.loads(result.stdout)}
    client = MlflowClient(uri)
    children = client.search_runs(
        [client.get_run(parent_id).info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    finals = final_losses(client, children)
    sgd = [finals[("optax:sgd lr=1e-5", s)] for s in SEEDS]
    adamw = [finals[(ADAMW, s)] for s in SEEDS]
    row = rows["optax:sgd lr=1e-5"]
    assert row["n"] == 3 and row["mean"] == pytest.approx(np.mean(sgd))
    assert row["std"] == pytest.approx(np.std(sgd, ddof=1))
    low, high = stats.t.interval(0.95, 2, loc=np.mean(sgd), scale=stats.sem(sgd))
    assert row["ci95"] == pytest.approx([low, high])
    # sgd at 1e-5 barely moves: worse than the best adamw on every seed, p < 0.05.
    assert row["test"] == "paired t" and row["verdict"] == "worse" and row["p_value"] < 0.05
    best = rows[row["versus"]]
    assert best["group"] in (ADAMW, CHAIN)
    expected = stats.ttest_rel(sgd, [finals[(best["group"], s)] for s in SEEDS])
    assert row["p_value"] == pytest.approx(expected.pvalue, rel=1e-6)
    # The same optimizer written two ways cannot be told apart.
    assert rows[ADAMW]["verdict"] == rows[CHAIN]["verdict"] == "not distinguishable (n=3)"
    # sgd against adamw alone: adamw is better, with p < 0.05.
    two = [s for s in compare_runs(EXPERIMENT, tracking_uri=uri, parent_run_id=parent_id)
           if s.group != CHAIN]  # fmt: skip
    first, second = group_statistics(two)
    assert (first.group, first.verdict, second.verdict) == (ADAMW, "better", "worse")
    assert first.p_value == pytest.approx(stats.ttest_rel(adamw, sgd).pvalue, rel=1e-6)
    assert first.p_value < 0.05
    # The sweep's own summary holds the same statistics.
    assert {g["group"]: g["verdict"] for g in printed["groups"]} == {
        name: r["verdict"] for name, r in rows.items()
    }


@pytest.mark.slow
def test_compare_group_csv_chart_and_target(sweep, tmp_path):
    uri, printed = sweep
    base = ["compare", "--experiment", EXPERIMENT, "--tracking-uri", uri,
            "--parent", printed["parent_run_id"], "--group"]  # fmt: skip
    done = invoke(*base, "--csv", "--target", "100")
    assert done.exit_code == 0, done.output
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert len(rows) == 3
    assert all(row["reached"] == "3" and float(row["steps_to_target"]) == 4.0 for row in rows)
    assert all(float(row["tokens_to_target"]) == 4 * 8 * 32 for row in rows)
    chart = tmp_path / "groups.png"
    drawn = invoke(*base, "--x", "tokens", "--output", str(chart))
    assert drawn.exit_code == 0, drawn.output
    assert "not distinguishable (n=3)" in drawn.stdout and "worse" in drawn.stdout
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--seeds", "0,x"], "--seeds '0,x'"),
        (["--seeds", "1,1"], "distinct"),
        (["--seeds", "0,1", "--repeats", "2"], "pass one of them"),
        (["--repeats", "2", "--seed", "3"], "--seed sets one seed"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--group", "g"], "--group cannot be used with sweep"),
    ],
)
def test_sweep_refuses_bad_seeds_in_one_line(tmp_path, args, fragment):
    uri = f"sqlite:///{tmp_path}/runs.db"
    result = invoke("sweep", "--optimizer", SGD, "--optimizer", ADAMW, "--tracking-uri", uri,
                    *args)  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert not (tmp_path / "runs.db").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--test", "anova"], "--test 'anova'"),
        (["--x", "epochs"], "--x 'epochs'"),
        (["--target", "2"], "--target reports per group"),
    ],
)
def test_compare_refuses_bad_statistics_options(tmp_path, args, fragment):
    result = invoke("compare", "--tracking-uri", f"sqlite:///{tmp_path}/runs.db", *args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.stderr


@pytest.mark.slow
def test_the_report_is_an_artifact_of_the_parent_with_the_same_numbers(sweep, tmp_path):
    uri, printed = sweep
    parent_id = printed["parent_run_id"]
    client = MlflowClient(uri)
    page = Path(client.download_artifacts(parent_id, REPORT_ARTIFACT, str(tmp_path))).read_text()
    compared = invoke("compare", "--experiment", EXPERIMENT, "--tracking-uri", uri,
                      "--parent", parent_id, "--group", "--json")  # fmt: skip
    rows = {row["group"]: row for row in json.loads(compared.stdout)}
    shown = report_rows(page)
    assert set(shown) == set(rows)
    for name, cells in shown.items():
        for key, _ in COLUMNS:
            assert same(cells[key], rows[name][key]), (name, key, cells[key], rows[name][key])
    # Charts on every budget axis the runs logged, inline; nothing the page could fetch.
    assert page.count("src='data:image/png;base64,") == 4  # steps, tokens, seconds, flops
    assert not re.search(r"(src|href)=['\"](?!data:)", page)
    assert "default-src 'none'" in page
    for spec in (SGD, ADAMW, CHAIN):
        assert html.escape(spec, quote=True) in page


@pytest.mark.slow
def test_the_report_opens_in_chromium_with_no_refused_request(sweep, tmp_path):
    chromium = browser()
    uri, printed = sweep
    out = tmp_path / "report.html"
    done = invoke("report", "--experiment", EXPERIMENT, "--tracking-uri", uri,
                  "--parent", printed["parent_run_id"], "--output", str(out))  # fmt: skip
    assert done.exit_code == 0, done.output
    shown = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
         "--v=0", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", out.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "Statistics" in shown.stdout and "not distinguishable (n=3)" in shown.stdout
    assert shown.stdout.count("<img") == 4
    for refused in ("Refused to", "net::ERR_", "Failed to load"):
        assert refused not in shown.stderr, shown.stderr[-2000:]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([], "--output FILE.html, --log-artifact"),
        (["--log-artifact"], "--log-artifact needs --parent"),
        (["--output", "r.png"], "not an .html file"),
        (["--output", "r.html", "--test", "z"], "--test 'z'"),
    ],
)
def test_report_refuses_bad_options_in_one_line(tmp_path, args, fragment):
    result = invoke("report", "--tracking-uri", f"sqlite:///{tmp_path}/runs.db", *args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert not (tmp_path / "runs.db").exists()
