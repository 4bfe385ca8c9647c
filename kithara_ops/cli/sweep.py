"""``kithara-ops sweep``: one run per optimizer, same everything else, under a parent run;
or, with ``$placeholders`` in the specs, a grid or an Optuna search per optimizer."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal

import typer

from kithara_ops.cli.app import app, user_errors
from kithara_ops.cli.sweep_runs import (
    create_parent,
    log_report,
    parse_seeds,
    train_here,
    train_in_new_process,
    train_options,
    ui_pointer,
)
from kithara_ops.errors import ConfigError

_SEARCH_ONLY = ("prune", "study_storage", "study_name", "confirm_seeds")


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog=(
        "Any train option may follow and applies to every run.\n\n"
        "Examples:\n\n"
        "  kithara-ops sweep --optimizer 'optax.adamw(1e-3)' --optimizer 'keras.AdamW(1e-3)'"
        " --optimizer 'optax.lion(1e-4)' --steps 200 --experiment cmp --parallel 2\n\n"
        "  kithara-ops sweep --optimizer 'optax.adamw($lr)' --optimizer 'optax.sgd($lr, "
        "momentum=0.9)' --grid 'lr=1e-3,1e-2,1e-1' --confirm-seeds 0,1 --eval-data stdlib"
        " --eval-every 10\n\n"
        "  kithara-ops sweep --optimizer 'optax.adamw($lr, b2=$b2)' --space "
        "'lr=loguniform(1e-5,1e-2)' --space 'b2=choice(0.95,0.999)' --trials 20 --prune "
        "median --study-storage sqlite:///study.db --eval-data stdlib --eval-every 10"
    ),
)
@user_errors
def sweep(
    ctx: typer.Context,
    optimizers: Annotated[
        list[str],
        typer.Option(
            "--optimizer",
            help="An optimizer spec; repeat for each run. $NAME "
            "marks a hyperparameter that --grid or --space tunes.",
        ),
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
    grid: Annotated[
        list[str] | None,
        typer.Option(metavar="NAME=A,B,...", help="Try every listed value of $NAME."),
    ] = None,
    space: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME=DIST",
            help="Sample $NAME from loguniform(LOW,HIGH), "
            "uniform(LOW,HIGH), int(LOW,HIGH) or choice(A,B,...), with --trials.",
        ),
    ] = None,
    trials: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="Optuna trials per optimizer (pip install "
            "'kithara-ops[search]'); each is a child run, judged by eval_loss.",
        ),
    ] = None,
    prune: Annotated[
        Literal["median", "hyperband"] | None,
        typer.Option(help="Stop hopeless trials at their evaluations (KILLED runs)."),
    ] = None,
    study_storage: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            help="An Optuna storage (sqlite:///f.db, postgresql://"
            "...): sweep processes naming it fill one study, each trial once.",
        ),
    ] = None,
    study_name: Annotated[
        str | None,
        typer.Option(help="The study's name; default: a hash of the whole command."),
    ] = None,
    confirm_seeds: Annotated[
        str | None,
        typer.Option(
            metavar="0,1,2",
            help="After the search, train each optimizer's best "
            "configuration once per seed, for compare --group.",
        ),
    ] = None,
    parallel: Annotated[
        int,
        typer.Option(
            help="Runs trained at once, each in its own process; 1 trains them one after "
            "another in this process."
        ),
    ] = 1,
    metric: Annotated[
        str | None,
        typer.Option(help="Metric of the summary table; default loss (eval_loss for a search)."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Train one run per optimizer (and per seed) on the same model and data, as child runs
    of one MLflow parent run, then print how they compare and log the comparison report.
    With $NAME in the specs, tune each optimizer on the same budget first (a grid or an
    Optuna search), then confirm the best of each over seeds."""
    from kithara_ops.cli.train import resolve_config
    from kithara_ops.optim.search_space import search_design

    if parallel < 1:
        raise ConfigError(f"--parallel must be at least 1, got {parallel}.")
    params = train_options(ctx.args)
    forbidden_options = ("optimizer", "resume", "checkpoint_dir", "parent_run_id", "print_config")
    for forbidden in (*forbidden_options, "coordinator", "num_processes", "group"):
        if params.get(forbidden):
            raise ConfigError(f"--{forbidden.replace('_', '-')} cannot be used with sweep.")
    config = resolve_config(params.get("config_file"), params)
    if not config.tracking:
        raise ConfigError("sweep compares runs in MLflow: drop --no-tracking.")
    design = search_design(optimizers, space or [], grid or [], trials)
    given = {"prune": prune, "study_storage": study_storage, "study_name": study_name,
             "confirm_seeds": confirm_seeds}  # fmt: skip
    if design.searched:
        from kithara_ops.cli.sweep_search import run_search

        if seeds is not None or repeats is not None:
            raise ConfigError("A search's seeds are --confirm-seeds: drop --seeds/--repeats.")
        run_search(config, design, parallel=parallel, metric=metric or "eval_loss",
                   json_output=json_output, **given)  # fmt: skip
        return
    for name in _SEARCH_ONLY:
        if given[name] is not None:
            raise ConfigError(
                f"--{name.replace('_', '-')} belongs to a search: write $NAME in a spec and "
                "tune it with --grid or --space."
            )
    seed_list = parse_seeds(seeds, repeats, config.seed, params.get("seed") is not None)
    _compare(ctx, config, optimizers, seed_list, parallel, metric or "loss", json_output)


def _compare(ctx, config, optimizers, seed_list, parallel, metric, json_output) -> None:
    """The plain sweep: every optimizer (and seed) once, then the comparison."""
    from mlflow import MlflowClient

    from kithara_ops.cli.progress import stdout_for_json
    from kithara_ops.optim.describe import describe_optimizer
    from kithara_ops.optim.spec import build_optimizer
    from kithara_ops.tracking import experiments
    from kithara_ops.tracking.compare import compare_runs
    from kithara_ops.tracking.compare_table import print_group_table, print_table
    from kithara_ops.tracking.groups import group_statistics
    from kithara_ops.tracking.tracker import resolve_experiment

    if len(optimizers) < 2:
        raise ConfigError("sweep needs at least two --optimizer specs to compare.")
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
    design_params = {f"sweep.optimizer.{i}": spec for i, spec in enumerate(optimizers)}
    design_params.update({f"sweep.group.{i}": group for i, group in enumerate(groups)})
    design_params["sweep.seeds"] = ",".join(str(seed) for seed in seed_list)
    parent_id = create_parent(client, experiment_id, config,
                              f"sweep of {len(optimizers)} optimizers{by_seeds}", design_params)  # fmt: skip

    # With several seeds a run is named by its group and seed; with one, by its optimizer.
    seeded = len(seed_list) > 1
    design = [
        (spec, group, seed, f"{group} seed {seed}" if seeded else None)
        for seed in seed_list
        for spec, group in zip(optimizers, groups)
    ]
    if parallel == 1:
        with stdout_for_json(json_output):
            codes = [train_here(config, parent_id, experiment_name, *one) for one in design]
    else:

        def child(one: tuple) -> int:
            return train_in_new_process(ctx.args, config, parent_id, experiment_name, *one)

        with ThreadPoolExecutor(max_workers=parallel) as pool:
            codes = list(pool.map(child, design))
    failed = sum(code != 0 for code in codes)
    client.set_terminated(parent_id, "FAILED" if failed else "FINISHED")
    summaries = compare_runs(
        experiment_name, tracking_uri=config.tracking_uri, metric=metric, parent_run_id=parent_id
    )
    stats = group_statistics(summaries, metric) if seeded else []
    log_report(client, experiment_name, config.tracking_uri, parent_id, metric, summaries)
    ui = ui_pointer(config.tracking_uri, experiment_id, parent_id, metric)
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
