"""``kithara-ops compare``: a table (and optionally a chart) of an experiment's runs."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from kithara_ops.cli.app import app, user_errors
from kithara_ops.errors import ConfigError

SOURCE = "Runs"
STATS = "Groups and statistics"
OUTPUT = "Output"


def _artifact_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", metric) + ".png"


def _samples(tracking_uri: str | None, summaries: list) -> dict[str, list]:
    """Each run's rows of its last generation step, for the runs that logged samples."""
    from mlflow.tracking import MlflowClient

    from kithara_ops.config.credentials import take_credentials
    from kithara_ops.tracking.samples_table import samples_by_run

    return samples_by_run(MlflowClient(take_credentials(tracking_uri)), summaries)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  kithara-ops compare\n\n"
        "  kithara-ops compare --metric eval_loss --output charts/eval_loss.png\n\n"
        "  kithara-ops compare --tracking-uri http://127.0.0.1:5000 --experiment sweep --json\n\n"
        "  kithara-ops compare --csv > runs.csv\n\n"
        "  kithara-ops compare --parent 3f2a... --log-artifact\n\n"
        "  kithara-ops compare --parent 3f2a... --group --target 2.5 --json"
    )
)
@user_errors
def compare(
    experiment: Annotated[
        str,
        typer.Option(
            envvar="MLFLOW_EXPERIMENT_NAME",
            help="MLflow experiment whose runs to compare.",
            rich_help_panel=SOURCE,
        ),
    ] = "kithara-ops",
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            envvar="MLFLOW_TRACKING_URI",
            help="Tracking server or store, e.g. http://127.0.0.1:5000. Unset: MLflow's default.",
            rich_help_panel=SOURCE,
        ),
    ] = None,
    parent: Annotated[
        str | None,
        typer.Option(
            metavar="RUN_ID",
            help="Only the child runs of this parent run.",
            rich_help_panel=SOURCE,
        ),
    ] = None,
    metric: Annotated[
        str,
        typer.Option(
            help="Metric to compare: loss, eval_loss, perplexity, tokens_per_second, ...",
            rich_help_panel=SOURCE,
        ),
    ] = "loss",
    group: Annotated[
        bool,
        typer.Option(
            "--group",
            help="One row per group of runs (an optimizer over several seeds): mean, 95% "
            "interval, and a test against the best group with a verdict.",
            rich_help_panel=STATS,
        ),
    ] = False,
    group_by: Annotated[
        str,
        typer.Option(
            metavar="PARAM",
            help="The param or tag that names each run's group (implies --group).",
            rich_help_panel=STATS,
        ),
    ] = "group",
    target: Annotated[
        float | None,
        typer.Option(
            metavar="VALUE",
            help="A value of the metric: report the steps, tokens, seconds and FLOPs to reach it.",
            rich_help_panel=STATS,
        ),
    ] = None,
    test: Annotated[
        str,
        typer.Option(
            help="Test of runs paired by seed: t (paired t-test) or wilcoxon (signed-rank). "
            "Runs that do not pair get Welch's t-test.",
            rich_help_panel=STATS,
        ),
    ] = "t",
    x: Annotated[
        str,
        typer.Option(
            "--x",
            help="The chart's x axis, the budget: steps, tokens, seconds or flops.",
            rich_help_panel=OUTPUT,
        ),
    ] = "steps",
    output: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE.png",
            help="Also write a line chart of the metric by step, one line per run.",
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    log_artifact: Annotated[
        bool,
        typer.Option(
            "--log-artifact",
            help="Log the chart to the --parent run as charts/<metric>.png.",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    json_output: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the runs as one JSON list (without histories) instead of a table.",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    csv_output: Annotated[
        bool,
        typer.Option(
            "--csv",
            help="Print the runs as CSV (a header row, then one row per run) instead of a table.",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
) -> None:
    """Compare the runs of an experiment on one metric, best first."""
    from kithara_ops.tracking.compare import compare_runs, plot_runs, to_csv
    from kithara_ops.tracking.compare_table import print_table

    if json_output and csv_output:
        raise ConfigError("--json and --csv both print the runs: pick one.")
    if log_artifact and parent is None:
        raise ConfigError("--log-artifact needs --parent RUN_ID: the run to log the chart to.")
    if output is not None and output.suffix.lower() != ".png":
        raise ConfigError(f"--output {str(output)!r} is not a .png file.")
    from kithara_ops.tracking.compare import BUDGETS
    from kithara_ops.tracking.groups import TESTS

    if test not in TESTS:
        raise ConfigError(f"--test {test!r} is not a test: use one of {', '.join(TESTS)}.")
    if x not in BUDGETS:
        raise ConfigError(f"--x {x!r} is not a budget axis: use one of {', '.join(BUDGETS)}.")
    group = group or group_by != "group"
    if target is not None and not group:
        raise ConfigError("--target reports per group: add --group.")
    summaries = compare_runs(
        experiment, tracking_uri=tracking_uri, metric=metric, parent_run_id=parent,
        group_by=group_by,
    )  # fmt: skip
    plotted = any(summary.history for summary in summaries)
    if (output is not None or log_artifact) and not plotted:
        which = "no child run of the --parent" if parent else "no run"
        raise ConfigError(
            f"{which} in experiment {experiment!r} logged {metric!r}: nothing to plot."
        )
    if summaries and not plotted:
        typer.echo(f"Warning: no run in experiment {experiment!r} logged {metric!r}.", err=True)

    for_scripts = json_output or csv_output  # stdout holds the data alone
    if group:
        _print_groups(summaries, metric, test, target, x, output, json_output, csv_output)
        return
    if json_output:
        found = _samples(tracking_uri, summaries)
        rows = [{**s.to_dict(), **({"samples": found[s.run_id]} if s.run_id in found else {})}
                for s in summaries]  # fmt: skip
        typer.echo(json.dumps(rows, allow_nan=False))
    elif csv_output:
        typer.echo(to_csv(summaries), nl=False)
    elif not summaries:
        typer.echo(f"No runs to compare in experiment {experiment!r}.")
    else:
        from kithara_ops.tracking.samples_table import print_samples

        print_table(summaries, metric)
        print_samples(summaries, _samples(tracking_uri, summaries))

    chart = plot_runs(summaries, metric, output, x) if output is not None else None
    if chart is not None:
        typer.echo(f"Chart: {chart}", err=for_scripts)
    if log_artifact:
        from mlflow.tracking import MlflowClient

        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / _artifact_name(metric)
            if chart is not None:
                shutil.copyfile(chart, png)
            else:
                plot_runs(summaries, metric, png, x)
            MlflowClient(tracking_uri).log_artifact(parent, str(png), artifact_path="charts")
        typer.echo(f"Logged charts/{png.name} to run {parent}.", err=for_scripts)


def _print_groups(summaries, metric, test, target, x, output, json_output, csv_output) -> None:
    """``compare --group``: the statistics per group, as a table, JSON or CSV, and the chart
    of each group's mean curve with its band."""
    from kithara_ops.tracking.compare_table import print_group_table
    from kithara_ops.tracking.groups import group_statistics, plot_groups, to_csv

    groups = group_statistics(summaries, metric, test=test, target=target)
    if json_output:
        typer.echo(json.dumps([g.to_dict() for g in groups], allow_nan=False))
    elif csv_output:
        typer.echo(to_csv(groups), nl=False)
    else:
        print_group_table(groups, metric)
    if output is not None:
        typer.echo(
            f"Chart: {plot_groups(groups, metric, output, x)}", err=json_output or csv_output
        )
