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
    seeds: Annotated[
        str | None,
        typer.Option(
            metavar="0,1,2",
            help="Train every optimizer once per seed (initial weights, data order and the "
            "step's RNG), so runs pair by seed in compare --group.",
        ),
    ] = None,
    repeats: Annotated[
        int | None,
        typer.Option(metavar="N", help="The seeds 0 to N-1 (instead of --seeds)."),
    ] = None,
    parallel: Annotated[
        int,
        typer.Option(
            help="Runs trained at once, each in its own process; 1 trains them one after "
            "another in this process."
        ),
    ] = 1,
    metric: Annotated[str, typer.Option(help="Metric of the summary table.")] = "loss",
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Train one run per optimizer (and per seed) on the same model and data, as child runs
    of one MLflow parent run, then print how they compare and log the comparison report."""
    from mlflow import MlflowClient

    from kithara_ops.cli.progress import stdout_for_json
    from kithara_ops.cli.train import resolve_config
    from kithara_ops.optim.describe import describe_optimizer
    from kithara_ops.optim.spec import build_optimizer
    from kithara_ops.tracking import experiments
    from kithara_ops.tracking.compare import compare_runs
    from kithara_ops.tracking.compare_table import print_group_table, print_table
    from kithara_ops.tracking.groups import group_statistics
    from kithara_ops.tracking.params import MAX_PARAM_LENGTH, MAX_PARAMS_PER_BATCH, shorten
    from kithara_ops.tracking.tracker import resolve_experiment

    if len(optimizers) < 2:
        raise ConfigError("sweep needs at least two --optimizer specs to compare.")
    if parallel < 1:
        raise ConfigError(f"--parallel must be at least 1, got {parallel}.")
    params = _train_options(ctx.args)
    forbidden_options = ("optimizer", "resume", "checkpoint_dir", "parent_run_id", "print_config")
    for forbidden in (*forbidden_options, "coordinator", "num_processes", "group"):
        if params.get(forbidden):
            raise ConfigError(f"--{forbidden.replace('_', '-')} cannot be used with sweep.")
    config = resolve_config(params.get("config_file"), params)
    if not config.tracking:
        raise ConfigError("sweep compares runs in MLflow: drop --no-tracking.")
    seed_list = _seeds(seeds, repeats, config.seed, params.get("seed") is not None)
    labels = [
        describe_optimizer(build_optimizer(spec, config.learning_rate, config.weight_decay))[
            "label"
        ]
        for spec in optimizers
    ]  # building each refuses a bad spec before any run
    groups = [
        label if labels.count(label) == 1 else spec for spec, label in zip(optimizers, labels)
    ]

    client = MlflowClient(config.tracking_uri)
    experiment_name = resolve_experiment(config)
    experiment_id = experiments.experiment_id(client, experiment_name, create=True)
    by_seeds = f" x {len(seed_list)} seeds" if len(seed_list) > 1 else ""
    parent = client.create_run(
        experiment_id,
        run_name=f"sweep of {len(optimizers)} optimizers{by_seeds}",
        tags={"kithara_ops.sweep": "true"},
    )
    parent_id = parent.info.run_id
    shared = {
        k: shorten(v, MAX_PARAM_LENGTH) for k, v in config.to_dict().items() if k != "optimizer"
    }
    for i, (spec, group) in enumerate(zip(optimizers, groups)):
        shared[f"sweep.optimizer.{i}"] = shorten(spec, MAX_PARAM_LENGTH)
        shared[f"sweep.group.{i}"] = shorten(group, MAX_PARAM_LENGTH)
    shared["sweep.seeds"] = ",".join(str(seed) for seed in seed_list)
    shared.pop("seed", None)  # the children's own; the parent records the design
    from mlflow.entities import Param

    items = list(shared.items())
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        batch = items[i : i + MAX_PARAMS_PER_BATCH]
        client.log_batch(parent_id, params=[Param(k, str(v)) for k, v in batch])

    # With several seeds a run is named by its group and seed; with one, by its optimizer.
    seeded = len(seed_list) > 1
    design = [
        (spec, group, seed, f"{group} seed {seed}" if seeded else None)
        for seed in seed_list
        for spec, group in zip(optimizers, groups)
    ]
    if parallel == 1:
        with stdout_for_json(json_output):
            codes = [_train_here(config, parent_id, experiment_name, *one) for one in design]
    else:

        def child(one: tuple) -> int:
            return _train_in_new_process(ctx.args, config, parent_id, experiment_name, *one)

        with ThreadPoolExecutor(max_workers=parallel) as pool:
            codes = list(pool.map(child, design))
    failed = sum(code != 0 for code in codes)
    client.set_terminated(parent_id, "FAILED" if failed else "FINISHED")
    summaries = compare_runs(
        experiment_name, tracking_uri=config.tracking_uri, metric=metric, parent_run_id=parent_id
    )
    stats = group_statistics(summaries, metric) if seeded else []
    _log_report(client, experiment_name, config.tracking_uri, parent_id, metric, summaries)
    ui = _ui_pointer(config.tracking_uri, experiment_id, parent_id, metric)
    if json_output:
        runs = [s.to_dict() for s in summaries]
        out = {"parent_run_id": parent_id, "runs": runs, "ui": ui}
        if seeded:
            out["groups"] = [g.to_dict() for g in stats]
        print(json.dumps(out, allow_nan=False))
    else:
        print_table(summaries, metric)
        if seeded:
            print_group_table(stats, metric)
        typer.echo(f"parent run: {parent_id}")
        typer.echo(f"MLflow UI: {ui}")
    if failed:
        raise typer.Exit(1)


def _seeds(seeds: str | None, repeats: int | None, seed: int, seed_given: bool) -> list[int]:
    """The sweep's seeds: ``--seeds``, else ``0..repeats-1``, else the one ``--seed``."""
    if seeds is not None and repeats is not None:
        raise ConfigError("--seeds and --repeats both choose the seeds: pass one of them.")
    if (seeds is not None or repeats is not None) and seed_given:
        raise ConfigError("--seed sets one seed: with --seeds or --repeats, list them there.")
    if repeats is not None:
        if repeats < 1:
            raise ConfigError(f"--repeats must be at least 1, got {repeats}.")
        return list(range(repeats))
    if seeds is None:
        return [seed]
    try:
        chosen = [int(part) for part in seeds.split(",")]
    except ValueError:
        raise ConfigError(
            f"--seeds {seeds!r} is not a list of integers: write e.g. 0,1,2."
        ) from None
    if len(set(chosen)) != len(chosen) or any(value < 0 for value in chosen):
        raise ConfigError(f"--seeds {seeds!r} must be distinct integers >= 0, e.g. 0,1,2.")
    return chosen


def _train_here(
    config, parent_id: str, experiment: str, spec: str, group: str, seed: int, name: str | None
) -> int:
    """Train one run of the sweep in this process; its exit code as ``train`` would give it.

    A stop signal ends the whole sweep (it propagates); any other failure is told in one
    line and the sweep goes on with the next run.
    """
    import keras

    from kithara_ops.build import build_trainer

    run = config.replace(optimizer=spec, seed=seed, group=group, parent_run_id=parent_id,
                         experiment=experiment, run_name=config.run_name or name)  # fmt: skip
    try:
        build_trainer(run).train()
        return 0
    except Exception as err:  # a stop signal is no Exception: it ends the sweep
        typer.echo(f"run with {spec!r} (seed {seed}) failed: {first_line(err)}", err=True)
        return 1
    finally:
        keras.backend.clear_session()  # the next run builds its model from a clean slate


def _train_in_new_process(args, config, parent_id, experiment, spec, group, seed, name) -> int:
    """Train one run of the sweep as ``kithara-ops train`` in a new process."""
    command = [sys.executable, "-m", "kithara_ops.cli", "train", *args,
               "--optimizer", spec, "--seed", str(seed), "--group", group,
               "--parent-run-id", parent_id, "--quiet", "--json", "--experiment", experiment]  # fmt: skip
    if name and not config.run_name:
        command += ["--run-name", name]
    if config.tracking_uri:
        command += ["--tracking-uri", config.tracking_uri]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        typer.echo(f"run with {spec!r} (seed {seed}) failed (exit {done.returncode}): {tail[0]}",
                   err=True)  # fmt: skip
    return done.returncode


def _log_report(client, experiment, tracking_uri, parent_id, metric, summaries) -> None:
    """Log the comparison report on the sweep's parent run; a failure costs only the report."""
    from kithara_ops.tracking.report import build_report, log_report

    try:
        page = build_report(experiment, tracking_uri=tracking_uri, parent_run_id=parent_id,
                            metric=metric, summaries=summaries)  # fmt: skip
        log_report(client, parent_id, page)
    except Exception as err:
        typer.echo(f"Warning: the comparison report was not logged: {first_line(err)}", err=True)
