"""The comparison page in a real browser: after a sweep, the page ``kithara-ops ui`` prints
charts every run's loss and lists the runs by optimizer label, with the optimizer columns.

Headless Chromium (Debian's ``chromium``; ``.ci/run`` installs it) loads the page from a real
``mlflow server``; the test is skipped only where no Chromium is installed.
"""

import html
import json
import re
import shutil
import subprocess

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from kithara_ops.cli import app

runner = CliRunner()
FAST = ["--model", "tiny", "--data", "synthetic", "--seq-len", "32", "--batch-size", "8"]
SPECS = ["optax.adamw(0.003)", "optax.sgd(0.03)"]
BROWSERS = ("chromium", "chromium-browser")
# Virtual time runs only while the page is idle, so the budget is page time (the UI's scripts
# and its calls to the server), not a fixed wait; the timeout bounds the real time.
PAGE_TIME_MS = 30_000
BROWSER_TIMEOUT_S = 150


def browser() -> str:
    """The Chromium executable, or skip the test saying why."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium (apt-get install chromium; .ci/run installs it where apt works)")


def load(url: str, folder, name: str, size: str = "1600,1000") -> str:
    """The page's text after its scripts ran; a screenshot is saved as ``folder/name.png``,
    the page's markup as ``folder/name.html``."""
    command = [
        browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        f"--user-data-dir={folder / 'profile'}", f"--window-size={size}",
        f"--virtual-time-budget={PAGE_TIME_MS}", "--run-all-compositor-stages-before-draw",
        f"--screenshot={folder / f'{name}.png'}", "--dump-dom", url,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    (folder / f"{name}.html").write_text(done.stdout)
    markup = re.sub(r"<(script|style)\b.*?</\1>", " ", done.stdout, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", markup)).split())


def shown_params(markup: str) -> list[str]:
    """The param columns of the runs table from left to right, as laid out (not as the
    markup lists them: the grid places its header cells by their ``left`` offset)."""
    cells = re.findall(r'<div[^>]*class="ag-header-cell\b[^>]*>', markup)
    placed = []
    for cell in cells:
        key = re.search(r'col-id="params\.`([^`]+)`"', cell)
        left = re.search(r"left: (-?\d+(?:\.\d+)?)px", cell)
        if key and left:
            placed.append((float(left.group(1)), key.group(1)))
    return [key for _, key in sorted(placed)]


def printed_url(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("MLflow UI: ")]
    assert len(lines) == 1, output
    return lines[0].removeprefix("MLflow UI: ")


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000, len(data)  # a blank 1600x1000 page is about 5 KB


@pytest.mark.slow
def test_after_a_sweep_the_printed_page_charts_every_run_by_optimizer(mlflow_server, tmp_path):
    browser()  # skip before training when there is nothing to look with
    args = ["sweep", *[a for s in SPECS for a in ("--optimizer", s)], *FAST, "--steps", "4",
            "--log-every", "1", "--no-system-metrics", "--experiment", "ui-browser",
            "--tracking-uri", mlflow_server.uri, "--parallel", "2"]  # fmt: skip
    swept = runner.invoke(app, args)
    assert swept.exit_code == 0, swept.output
    parent_id = swept.stdout.split("parent run: ", 1)[1].split()[0]
    client = MlflowClient(mlflow_server.uri)
    experiment_id = client.get_experiment_by_name("ui-browser").experiment_id
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    names = sorted(run.info.run_name for run in children)
    assert len(names) == 2 and names[0] != names[1], names
    assert all(run.data.tags["optimizer.label"] == run.info.run_name for run in children)

    # What the sweep prints is the page `ui --run` prints for it.
    focused = runner.invoke(app, ["ui", "--tracking-uri", mlflow_server.uri, "--run", parent_id])
    assert focused.exit_code == 0, focused.output
    assert printed_url(swept.stdout) == printed_url(focused.stdout)

    shown = runner.invoke(
        app, ["ui", "--tracking-uri", mlflow_server.uri, "--experiment", "ui-browser"]
    )
    assert shown.exit_code == 0, shown.output
    url = printed_url(shown.stdout)
    assert url.startswith(f"{mlflow_server.uri}/#/experiments/{experiment_id}/runs?")

    text = load(url, tmp_path, "charts")
    assert_png(tmp_path / "charts.png")
    charts = re.search(r"Model metrics \( ?(\d+) ?\)", text)
    assert charts and int(charts.group(1)) >= 1, text[:3000]
    assert "No charts in this section" not in text.split("System metrics")[0], text[:3000]
    for name in names:  # rows of their own (not under a collapsed parent), and loss legends
        assert name in text, (name, text[:3000])
        assert f"{name} (loss)" in text, (name, text[:3000])
    assert "kithara-ops comparison" in text  # the shared view was loaded
    first_chart = re.search(r"Model metrics \( ?\d+ ?\) Add chart (\S+)", text)
    assert first_chart and first_chart.group(1) == "loss", text[:3000]

    # Wide enough for every column: the table renders only the columns in view.
    table_url = url.replace("compareRunsMode=CHART", "compareRunsMode=TABLE")
    table = load(table_url, tmp_path, "table", size="2600,1000")
    assert_png(tmp_path / "table.png")
    # adamw and sgd differ in their name and learning rate (and in b1, which sgd lacks), not
    # in their family; whole chains are left out.
    for key in ("optimizer.name", "optimizer.learning_rate", "optimizer.b1"):
        assert key in table, (key, table[:3000])
    for key in ("optimizer.family", "optimizer.chain", "optimizer.spec"):
        assert key not in table, (key, table[:3000])
    assert "sgd(learning_rate" not in table
    # The name first, then the learning rate: the table alone would sort them by key.
    params = shown_params((tmp_path / "table.html").read_text())
    assert params[:2] == ["optimizer.name", "optimizer.learning_rate"], params
    for name in names:
        assert name in table
    (tmp_path / "pages.json").write_text(json.dumps({"charts": text, "table": table}))


@pytest.mark.slow
def test_after_a_seeded_sweep_the_page_draws_one_grouped_curve_per_optimizer(
    mlflow_server, tmp_path
):
    browser()
    args = ["sweep", *[a for s in SPECS for a in ("--optimizer", s)], *FAST, "--steps", "4",
            "--log-every", "2", "--no-system-metrics", "--experiment", "ui-seeds",
            "--tracking-uri", mlflow_server.uri, "--seeds", "0,1"]  # fmt: skip
    swept = runner.invoke(app, args)
    assert swept.exit_code == 0, swept.output
    labels = ["optax:adamw lr=3e-3", "optax:sgd lr=0.03"]
    parent_id = swept.stdout.split("parent run: ", 1)[1].split()[0]
    # The page `ui --run` prints for the sweep is the one the sweep printed.
    focused = runner.invoke(app, ["ui", "--tracking-uri", mlflow_server.uri, "--run", parent_id])
    assert focused.exit_code == 0, focused.output
    assert printed_url(focused.stdout) == printed_url(swept.stdout)
    text = load(printed_url(focused.stdout), tmp_path, "grouped")
    assert_png(tmp_path / "grouped.png")
    assert "Group by: group" in text, text[:3000]
    for label in labels:  # a table row per group, holding its two seeds' runs
        assert f"Group: {label} 2" in text, (label, text[:3000])
    # The loss chart draws one curve per group (the mean of its seeds), none per run.
    loss_chart = text.split("Add chart loss", 1)[1].split("best_loss", 1)[0]
    assert re.findall(r"(optax:\S+ lr=\S+) \(loss\)", loss_chart) == labels, loss_chart
    assert "seed 0 (loss)" not in text and "seed 1 (loss)" not in text
