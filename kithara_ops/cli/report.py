"""``kithara-ops report``: one self-contained HTML page comparing a sweep's optimizers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kithara_ops.cli.app import app, user_errors
from kithara_ops.errors import ConfigError


@app.command(
    epilog=(
        "Examples:\n\n"
        "  kithara-ops report --experiment cmp --parent 3f2a... --output report.html\n\n"
        "  kithara-ops report --experiment cmp --parent 3f2a... --log-artifact\n\n"
        "  kithara-ops report --experiment cmp --metric eval_loss --target 2.5 --output r.html"
    )
)
@user_errors
def report(
    experiment: Annotated[
        str, typer.Option(envvar="MLFLOW_EXPERIMENT_NAME", help="MLflow experiment of the runs.")
    ] = "kithara-ops",
    tracking_uri: Annotated[
        str | None,
        typer.Option(envvar="MLFLOW_TRACKING_URI", help="Tracking server or store."),
    ] = None,
    parent: Annotated[
        str | None,
        typer.Option(metavar="RUN_ID", help="A sweep's parent run: compare its children."),
    ] = None,
    metric: Annotated[str, typer.Option(help="The metric compared.")] = "loss",
    target: Annotated[
        float | None, typer.Option(metavar="VALUE", help="Report the budgets to reach it.")
    ] = None,
    test: Annotated[str, typer.Option(help="t or wilcoxon, for runs paired by seed.")] = "t",
    output: Annotated[
        Path | None, typer.Option(metavar="FILE.html", help="Write the page here.")
    ] = None,
    log_artifact: Annotated[
        bool,
        typer.Option(
            "--log-artifact", help="Log the page to the --parent run (report/report.html)."
        ),
    ] = False,
) -> None:
    """Write the comparison report: each group's mean curve and band on every budget axis,
    the statistics of compare --group, stability, cost and each optimizer's description."""
    from kithara_ops.tracking.groups import TESTS
    from kithara_ops.tracking.report import REPORT_ARTIFACT, build_report, log_report

    if output is None and not log_artifact:
        raise ConfigError("report needs --output FILE.html, --log-artifact, or both.")
    if log_artifact and parent is None:
        raise ConfigError("--log-artifact needs --parent RUN_ID: the run to log the report to.")
    if output is not None and output.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"--output {str(output)!r} is not an .html file.")
    if test not in TESTS:
        raise ConfigError(f"--test {test!r} is not a test: use one of {', '.join(TESTS)}.")
    page = build_report(experiment, tracking_uri=tracking_uri, parent_run_id=parent,
                        metric=metric, test=test, target=target)  # fmt: skip
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(page, encoding="utf-8")
        typer.echo(f"Report: {output}")
    if log_artifact:
        from mlflow.tracking import MlflowClient

        log_report(MlflowClient(tracking_uri), parent, page)
        typer.echo(f"Logged to run {parent} as {REPORT_ARTIFACT}")
