"""``kithara-ops compare``'s output: a table that fits 80 columns and ``--json``/``--csv``.

The runs have the values that used to be cut: long labels, a schedule's learning rate, big and
tiny numbers, NaN, a diverged run and a run that logged nothing.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from rich.console import Console
from typer.testing import CliRunner

from kithara_ops.cli import app
from kithara_ops.tracking.compare import compare_runs
from kithara_ops.tracking.compare_table import print_table
from kithara_ops.tracking.params import DIVERGED_TAG

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = "wide"
SCHEDULE = "warmup_cosine(init=0.0, peak=0.001, warmup_steps=100, decay_steps=1000.0, end=0.0)"

# label -> (optimizer, lr, [(step, loss)], tokens/s, diverged at)
RUNS = {
    "optax:adamw lr=warmup_cosine(1e-3)": (
        "adamw", SCHEDULE, [(100, 2.5), (12345, 0.000123456)], 1234567.0, None,
    ),
    "optax:clip+lion lr=1e-4": ("lion", "0.0001", [(50, 3.25), (100, 2.125)], 98765.4, None),
    "keras:adamw lr=3e-4": ("adamw", "0.0003", [(10, 2.75), (20, float("nan"))], 5432.1, 20),
    "keras:sgd lr=1e-2": ("sgd", "0.01", [], None, None),
}  # fmt: skip
# The table's first line of each run, after its rank and its label's first word: status,
# steps, final, best and tok/s. Diverged runs and runs without the metric come last.
ROWS = {
    "optax:adamw": ("FINISHED", "12345", "0.0001235", "0.0001235", "1,234,567"),
    "optax:clip+lion": ("FINISHED", "100", "2.125", "2.125", "98,765"),
    "keras:adamw": ("DIVERGED@20", "20", "nan", "2.75", "5,432"),
    "keras:sgd": ("FINISHED", "-", "-", "-", "-"),
}
ORDER = list(RUNS)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A SQLite store whose experiment ``wide`` holds ``RUNS``."""
    folder = tmp_path_factory.mktemp("wide")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment(EXPERIMENT, artifact_location=folder.as_uri())
    for label, (name, lr, losses, speed, diverged) in RUNS.items():
        run = client.create_run(experiment, run_name=label).info.run_id
        metrics = [Metric("loss", loss, 1000 + step, step) for step, loss in losses]
        if speed is not None:
            metrics.append(Metric("tokens_per_second", speed, 1000, 10))
        tags = [RunTag("optimizer.label", label)]
        if diverged is not None:
            tags.append(RunTag(DIVERGED_TAG, str(diverged)))
        params = [Param("optimizer.name", name), Param("optimizer.learning_rate", lr)]
        client.log_batch(run, metrics=metrics, params=params, tags=tags)
        client.set_terminated(run)
    return uri


def first_lines(text: str) -> dict[str, list[str]]:
    """The words of each table row's first line, by the first word of the run's label."""
    rows = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) > 1 and words[0].isdigit():
            rows[words[1]] = words
    return rows


def check_numbers_whole(text: str) -> None:
    """Each run's status and numbers sit whole, in order, on the run's first line; the best
    runs come first."""
    rows = first_lines(text)
    assert sorted(rows) == sorted(ROWS), text
    assert [rows[first][0] for first in ["optax:adamw", "optax:clip+lion"]] == ["1", "2"]
    for first, values in ROWS.items():
        words = rows[first]
        positions = [words.index(value) for value in values]  # ValueError: cut or missing
        assert positions == sorted(positions), (values, words)


def check_words_whole(text: str, values: list[str]) -> None:
    """Each text value's words appear whole somewhere in ``text`` (it may wrap between them)."""
    words = set(text.split())
    for value in values:
        assert set(value.split()) <= words, (value, text)


def test_in_80_columns_no_number_or_value_is_cut(store):
    console = Console(width=80, force_terminal=True, color_system=None, record=True)
    print_table(compare_runs(EXPERIMENT, tracking_uri=store), "loss", console)
    text = console.export_text()
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80, text
    check_numbers_whole(text)
    check_words_whole(text, ORDER)
    # The schedule's 23-character word does not fit beside the rest: lr and optimizer are
    # left out, and the caption says so, rather than cut.
    assert SCHEDULE.split()[0] not in text
    assert "left out to fit: optimizer, lr" in text


def test_in_140_columns_every_column_is_shown(store):
    console = Console(width=140, force_terminal=True, color_system=None, record=True)
    print_table(compare_runs(EXPERIMENT, tracking_uri=store), "loss", console)
    text = console.export_text()
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 140, text
    check_numbers_whole(text)
    check_words_whole(text, [*ORDER, SCHEDULE, "lion", "0.0003"])
    assert "left out" not in text


def test_piped_each_run_is_one_whole_line_whatever_columns_says(store):
    result = CliRunner().invoke(
        app, ["compare", "--tracking-uri", store, "--experiment", EXPERIMENT],
        env={"COLUMNS": "80"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = first_lines(result.stdout)
    check_numbers_whole(result.stdout)
    for label in ORDER:
        assert label in " ".join(rows[label.split()[0]])
    assert SCHEDULE in " ".join(rows["optax:adamw"])  # not even the schedule wraps in a file


@pytest.mark.slow
def test_in_a_real_80_column_terminal(store):
    """The command in a pseudo-terminal, as a user at an 80-column terminal sees it."""
    primary, secondary = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80", "LINES": "40"}
    command = [sys.executable, "-m", "kithara_ops.cli", "compare", "--tracking-uri", store,
               "--experiment", EXPERIMENT]  # fmt: skip
    with subprocess.Popen(command, stdout=secondary, stderr=subprocess.PIPE, env=env) as child:
        os.close(secondary)
        chunks = []
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # the terminal closed: the command has exited
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert child.wait(timeout=120) == 0, child.stderr.read()
    os.close(primary)
    text = ANSI.sub("", b"".join(chunks).decode()).replace("\r\n", "\n")
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80, text
    check_numbers_whole(text)
    check_words_whole(text, ORDER)


def test_json_and_csv_hold_the_same_runs(store):
    base = ["compare", "--tracking-uri", store, "--experiment", EXPERIMENT]
    as_json = CliRunner().invoke(app, [*base, "--json"])
    as_csv = CliRunner().invoke(app, [*base, "--csv"])
    assert as_json.exit_code == as_csv.exit_code == 0, as_json.output + as_csv.output

    runs = json.loads(as_json.stdout)  # one document: anything else on stdout fails here
    assert [run["label"] for run in runs[:2]] == ORDER[:2]
    assert {run["label"] for run in runs[2:]} == set(ORDER[2:])
    by_label = {run["label"]: run for run in runs}
    diverged, silent = by_label[ORDER[2]], by_label[ORDER[3]]
    assert diverged["final"] is None and diverged["best"] == 2.75  # NaN as null
    assert diverged["status"] == "DIVERGED@20"
    assert runs[0]["learning_rate"] == SCHEDULE and runs[0]["final"] == 0.000123456
    assert runs[0]["tokens_per_second"] == 1234567.0 and runs[0]["steps"] == 12345
    assert silent["steps"] is silent["final"] is silent["tokens_per_second"] is None

    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert list(rows[0]) == list(runs[0])  # the same fields, in the same order
    for row, run in zip(rows, runs, strict=True):
        assert row == {key: "" if value is None else str(value) for key, value in run.items()}


def test_json_and_csv_together_are_a_usage_error(store):
    result = CliRunner().invoke(
        app, ["compare", "--tracking-uri", store, "--experiment", EXPERIMENT, "--json", "--csv"]
    )
    assert result.exit_code == 2
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("Error: ") and "--json" in line and "--csv" in line


def test_cost_figures_are_columns_when_runs_logged_them():
    from kithara_ops.tracking.compare import RunSummary

    runs = [
        RunSummary("a", "optax:adamw", "optax:adamw", "FINISHED", steps=10, final=1.5, best=1.4,
                   flops_per_second=2.28e10, mfu=0.412),
        RunSummary("b", "keras:adamw", "keras:adamw", "FINISHED", steps=10, final=1.6, best=1.5),
    ]  # fmt: skip
    console = Console(width=200, force_terminal=True, color_system=None, record=True)
    print_table(runs, "loss", console)
    text = console.export_text()
    assert "flop/s" in text and "22.8G" in text and "41.2%" in text, text
    narrow = Console(width=60, force_terminal=True, color_system=None, record=True)
    print_table(runs, "loss", narrow)
    squeezed = " ".join(narrow.export_text().split())
    assert "left out to fit: optimizer, flop/s, mfu" in squeezed  # before tok/s and lr
