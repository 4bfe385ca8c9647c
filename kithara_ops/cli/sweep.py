"""``kithara-ops sweep``: one run per optimizer, same everything else, under a parent run."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import typer

from kithara_ops.cli.app import USAGE_ERRORS, app, user_errors
from kithara_ops.errors import ConfigError, first_line


def _train_options(args: list[str]) -> dict:
    """Parse pass-through options with ``train``'s own parser (so they mean the same)."""
    command = typer.main.get_command(app).commands["train"]
    try:
        context = command.make_context("train", list(args), resilient_parsing=False)
    except USAGE_ERRORS as err:
        raise ConfigError(f"{err.format_message()} (in the options passed to train)") from None
    return context.params


def _ui_pointer(tracking_uri: str | None, experiment_id: str, parent_id: str, metric: str) -> str:
    """Where the sweep is compared in the MLflow UI: the page of a tracking server, else the
    ``kithara-ops ui`` command that serves a local store on that page."""
    import shlex
    from urllib.parse import urlparse

    from mlflow import MlflowClient, get_tracking_uri
    from mlflow.exceptions import MlflowException

    from kithara_ops.tracking.view import runs_url, share_comparison

    uri = tracking_uri or get_tracking_uri()
    if urlparse(uri).scheme not in ("http", "https"):
        where = f" --tracking-uri {shlex.quote(tracking_uri)}" if tracking_uri else ""
        return f"kithara-ops ui{where} --run {parent_id}"
    try:
        key = share_comparison(MlflowClient(uri), experiment_id, metric, parent_id)
    except MlflowException as err:
        typer.echo(f"Warning: the comparison view could not be saved: {first_line(err)}", err=True)
        key = None
    return runs_url(uri, experiment_id, key)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog=(
        "Any train option may follow and applies to every run.\n\n"
        "Example:\n\n"
        "  kithara-ops sweep --optimizer 'optax.adamw(1e-3)' --optimizer 'keras.AdamW(1e-3)'"
        " --optimizer 'optax.lion(1e-4)' --steps 200 --experiment cmp --parallel 2"
    ),
)
@user_errors
def sweep(
    ctx: typer.Context,
    optimizers: Annotated[
        list[str],
        typer.Option("--optimizer", help="An optimizer spec; repeat for each run."),
    ],
    parallel: Annotated[
        int, typer.Option(help="Runs trained at once, each in its own process.")
    ] = 1,
    metric: Annotated[str, typer.Option(help="Metric of the summary table.")] = "loss",
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Train one run per optimizer on the same model, data order and seed, as child runs
    of one MLflow parent run, then print how they compare."""
    from mlflow import MlflowClient

    from kithara_ops.cli.train import resolve_config
    from kithara_ops.optim.spec import build_optimizer
    from kithara_ops.tracking import experiments
    from kithara_ops.tracking.compare import compare_runs, print_table
    from kithara_ops.tracking.params import MAX_PARAM_LENGTH, MAX_PARAMS_PER_BATCH, shorten
    from kithara_ops.tracking.tracker import resolve_experiment

    if len(optimizers) < 2:
        raise ConfigError("sweep needs at least two --optimizer specs to compare.")
    if parallel < 1:
        raise ConfigError(f"--parallel must be at least 1, got {parallel}.")
    params = _train_options(ctx.args)
    forbidden_options = ("optimizer", "resume", "checkpoint_dir", "parent_run_id", "print_config")
    for forbidden in (*forbidden_options, "coordinator", "num_processes"):
        if params.get(forbidden):
            raise ConfigError(f"--{forbidden.replace('_', '-')} cannot be used with sweep.")
    config = resolve_config(params.get("config_file"), params)
    if not config.tracking:
        raise ConfigError("sweep compares runs in MLflow: drop --no-tracking.")
    for spec in optimizers:
        build_optimizer(spec, config.learning_rate, config.weight_decay)  # refuse bad specs first

    client = MlflowClient(config.tracking_uri)
    experiment_name = resolve_experiment(config)
    experiment_id = experiments.experiment_id(client, experiment_name, create=True)
    parent = client.create_run(
        experiment_id,
        run_name=f"sweep of {len(optimizers)} optimizers",
        tags={"kithara_ops.sweep": "true"},
    )
    parent_id = parent.info.run_id
    shared = {
        k: shorten(v, MAX_PARAM_LENGTH) for k, v in config.to_dict().items() if k != "optimizer"
    }
    for i, spec in enumerate(optimizers):
        shared[f"sweep.optimizer.{i}"] = shorten(spec, MAX_PARAM_LENGTH)
    from mlflow.entities import Param

    items = list(shared.items())
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        batch = items[i : i + MAX_PARAMS_PER_BATCH]
        client.log_batch(parent_id, params=[Param(k, str(v)) for k, v in batch])

    def child(spec: str) -> int:
        command = [sys.executable, "-m", "kithara_ops.cli", "train", *ctx.args,
                   "--optimizer", spec, "--parent-run-id", parent_id, "--quiet", "--json",
                   "--experiment", experiment_name]  # fmt: skip
        if config.tracking_uri:
            command += ["--tracking-uri", config.tracking_uri]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
            typer.echo(f"run with {spec!r} failed (exit {done.returncode}): {tail[0]}", err=True)
        return done.returncode

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        codes = list(pool.map(child, optimizers))
    failed = sum(code != 0 for code in codes)
    client.set_terminated(parent_id, "FAILED" if failed else "FINISHED")
    summaries = compare_runs(
        experiment_name, tracking_uri=config.tracking_uri, metric=metric, parent_run_id=parent_id
    )
    ui = _ui_pointer(config.tracking_uri, experiment_id, parent_id, metric)
    if json_output:
        runs = [s.to_dict() for s in summaries]
        print(json.dumps({"parent_run_id": parent_id, "runs": runs, "ui": ui}))
    else:
        print_table(summaries, metric)
        typer.echo(f"parent run: {parent_id}")
        typer.echo(f"MLflow UI: {ui}")
    if failed:
        raise typer.Exit(1)
