"""``kithara-ops sweep`` with ``$placeholders``: tune each optimizer, then confirm the best.

The search stage trains a grid's every point, or ``--trials`` Optuna trials per optimizer
(in this process, or shared with other processes through ``--study-storage``); the confirm
stage trains each optimizer's best configuration once per ``--confirm-seeds`` seed. Both
stages are child runs of one MLflow parent, whose report shows how sensitive each optimizer
is to what was tuned.
"""

from __future__ import annotations

import json
import math
from typing import Any

import typer

from kithara_ops.cli.sweep_runs import create_parent, log_report, parse_seeds, ui_pointer
from kithara_ops.errors import ConfigError
from kithara_ops.optim.search_space import LR_FIND, SearchDesign, fill, placeholders
from kithara_ops.search import (
    Trial,
    TrialPruning,
    best_trials,
    check_design,
    confirm,
    decide_lr_find,
    grid_trials,
    template_groups,
    train_trial,
)


def run_search(
    config: Any, design: SearchDesign, *, parallel: int, metric: str, json_output: bool,
    prune: str | None, study_storage: str | None, study_name: str | None,
    confirm_seeds: str | None,
) -> None:  # fmt: skip
    """Search, confirm, report; see the module's docstring."""
    from mlflow import MlflowClient

    from kithara_ops.cli.progress import stdout_for_json
    from kithara_ops.optim.describe import describe_optimizer
    from kithara_ops.optim.spec import build_optimizer
    from kithara_ops.tracking import experiments
    from kithara_ops.tracking.tracker import resolve_experiment

    check_design(config, design)
    sampled = bool(design.spaces)
    if parallel != 1:
        raise ConfigError(
            "A search trains its trials in this process: to train several at once, start "
            "several sweep processes with the same --study-storage."
        )
    if not sampled and (prune or study_storage or study_name):
        raise ConfigError("--prune and --study-storage belong to --trials (Optuna): a --grid "
                          "trains every point in this process.")  # fmt: skip
    seeds = parse_seeds(confirm_seeds, None, config.seed, False) if confirm_seeds else []
    templates = list(design.templates)
    labels = [  # building each with values from its space refuses a bad spec before any run
        describe_optimizer(build_optimizer(fill(t, design.representative(t)), config.learning_rate,
                                           config.weight_decay))["label"]
        for t in templates
    ]  # fmt: skip
    groups = template_groups(templates, labels)
    echo = _echo(json_output)
    if any(d.kind == LR_FIND for d in design.spaces.values()):
        with stdout_for_json(json_output):
            design = decide_lr_find(config, design, groups, echo)
    params = {f"sweep.optimizer.{i}": t for i, t in enumerate(templates)}
    params.update({f"sweep.group.{i}": g for i, g in enumerate(groups)})
    params.update(design.params())
    params["sweep.confirm_seeds"] = ",".join(map(str, seeds))
    what = f"{'search' if sampled else 'grid'} of {len(templates)} optimizer" + "s" * (
        len(groups) > 1
    )
    # The study first: a storage that cannot be opened is refused before MLflow is touched.
    study = (
        _open_study(config, design, prune, study_storage, study_name, params) if sampled else None
    )
    client = MlflowClient(config.tracking_uri)
    experiment = resolve_experiment(config)
    experiment_id = experiments.experiment_id(client, experiment, create=True)

    def new_parent() -> str:
        return create_parent(client, experiment_id, config, what, params)

    shared = None
    with stdout_for_json(json_output):
        if sampled:
            shared, parent_id, trials = _sampled(config, design, groups, study, new_parent,
                                                 experiment, echo, prune)  # fmt: skip
        else:
            parent_id = new_parent()
            trials = [_train(config, t, parent_id, experiment, echo, None)
                      for t in grid_trials(design, templates, groups)]  # fmt: skip
        best = best_trials(trials)
        going_on = shared is not None or not sampled
        confirmed = confirm(config, best, seeds, parent_id=parent_id, experiment=experiment,
                            echo=echo) if seeds and going_on else []  # fmt: skip
    if not going_on:  # other processes still train, or confirm: the search is theirs to end
        _print(parent_id, trials, best, [], [], metric, None, json_output)
        return
    failed = not best or any(t.state == "failed" for t in confirmed)
    client.set_terminated(parent_id, "FAILED" if failed else "FINISHED")
    summaries, stats = _compared(config, experiment, parent_id, metric, best, len(seeds))
    log_report(client, experiment, config.tracking_uri, parent_id, metric, summaries)
    ui = ui_pointer(config.tracking_uri, experiment_id, parent_id, metric)
    _print(parent_id, trials, best, summaries, stats, metric, ui, json_output)
    if failed:
        raise typer.Exit(1)


def _open_study(config, design, prune, storage, name, params):
    """The search's Optuna studies (see ``kithara_ops.study``)."""
    from kithara_ops.study import SharedStudy, default_study_name, make_pruner

    steps = config.total_steps(None)
    name = name or default_study_name({**params, "config": config.to_dict(), "prune": prune})
    pruner = make_pruner(prune, steps, config.eval_every)
    return SharedStudy(storage, name, design.trials, pruner, config.seed)


def _sampled(config, design, groups, shared, new_parent, experiment, echo, prune):
    """The Optuna stage: ``(study, parent_id, trials)``; ``study`` is ``None`` when this
    process is not the one to go on and confirm."""
    name = shared.name
    parent_id, _ = shared.parent(new_parent)
    for template, group in zip(design.templates, groups):
        while (asked := shared.claim(group)) is not None:
            space = design.space_for(template)
            values = {n: space[n].suggest(asked, n) for n in placeholders(template)}
            asked.set_user_attr("spec", fill(template, values))
            trial = Trial(group, asked.number, values, fill(template, values))
            shared.record(asked, _train(config, trial, parent_id, experiment, echo,
                                        TrialPruning(asked) if prune else None))  # fmt: skip
    trials = shared.results(groups)
    if not shared.done(groups):
        echo(f"study {name!r}: trials are still training in other processes; the last to end "
             "confirms the best and ends the parent run.")  # fmt: skip
        return None, parent_id, trials
    if not shared.claim_finish():
        echo(f"study {name!r} is complete; another process confirms it.")
        return None, parent_id, trials
    return shared, parent_id, trials


def _train(config, trial: Trial, parent_id: str, experiment: str, echo, pruning) -> Trial:
    name = f"{trial.group} trial {trial.number}"
    done = train_trial(config, trial, parent_id=parent_id, experiment=experiment,
                       seed=config.seed, stage="search", name=name,
                       callbacks=[pruning] if pruning else [], echo=echo)  # fmt: skip
    shown = f"{done.objective:.4g}" if done.objective is not None else "-"
    where = f" at step {done.pruned_at_step}" if done.state == "pruned" else ""
    echo(f"{name} {_values(done.values)}: {done.state}{where}, eval_loss {shown}")
    return done


def _compared(config, experiment, parent_id, metric, best, n_seeds):
    """Every child run summarised, and the confirmed groups' statistics (with 2+ seeds)."""
    from kithara_ops.tracking.compare import compare_runs
    from kithara_ops.tracking.groups import group_statistics

    summaries = compare_runs(experiment, tracking_uri=config.tracking_uri, metric=metric,
                             parent_run_id=parent_id)  # fmt: skip
    confirmed = [s for s in summaries if s.group in best]
    return summaries, group_statistics(confirmed, metric) if n_seeds > 1 else []


def _values(values: dict) -> str:
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
    )


def _echo(json_output: bool):
    """Progress lines: stdout for people, stderr when stdout carries JSON."""
    return lambda line: typer.echo(line, err=json_output)


def _print(parent_id, trials, best, summaries, stats, metric, ui, json_output) -> None:
    from kithara_ops.tracking.compare_table import print_group_table

    if json_output:
        out = {"parent_run_id": parent_id, "trials": [t.to_dict() for t in trials],
               "best": {g: t.to_dict() for g, t in best.items()},
               "runs": [s.to_dict() for s in summaries], "ui": ui}  # fmt: skip
        if stats:
            out["groups"] = [g.to_dict() for g in stats]
        print(json.dumps(out, allow_nan=False))
        return
    typer.echo(f"{'optimizer':<24} {'trial':>5}  {'values':<28} {'eval_loss':>10}  state")
    for t in trials:
        mark = " *" if best.get(t.group) is t else ""
        value = t.objective if t.objective is not None and math.isfinite(t.objective) else None
        shown = f"{value:.4f}" if value is not None else "-"
        typer.echo(f"{t.group:<24} {t.number:>5}  {_values(t.values):<28} {shown:>10}  "
                   f"{t.state}{mark}")  # fmt: skip
    if stats:
        print_group_table(stats, metric)
    typer.echo(f"parent run: {parent_id}")
    if ui:
        typer.echo(f"MLflow UI: {ui}")
