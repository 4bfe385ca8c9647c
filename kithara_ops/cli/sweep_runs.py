"""How a sweep trains and reports its children: in this process or one each, and where
the comparison is seen."""

from __future__ import annotations

import subprocess
import sys

import typer

from kithara_ops.cli.app import USAGE_ERRORS, app
from kithara_ops.errors import ConfigError, first_line


def train_options(args: list[str]) -> dict:
    """Parse pass-through options with ``train``'s own parser (so they mean the same)."""
    command = typer.main.get_command(app).commands["train"]
    try:
        context = command.make_context("train", list(args), resilient_parsing=False)
    except USAGE_ERRORS as err:
        raise ConfigError(f"{err.format_message()} (in the options passed to train)") from None
    return context.params


def ui_pointer(tracking_uri: str | None, experiment_id: str, parent_id: str, metric: str) -> str:
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


def parse_seeds(seeds: str | None, repeats: int | None, seed: int, seed_given: bool) -> list[int]:
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


def train_here(
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


def train_in_new_process(args, config, parent_id, experiment, spec, group, seed, name) -> int:
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


def log_report(client, experiment, tracking_uri, parent_id, metric, summaries) -> None:
    """Log the comparison report on the sweep's parent run; a failure costs only the report."""
    from kithara_ops.tracking.report import build_report, log_report

    try:
        page = build_report(experiment, tracking_uri=tracking_uri, parent_run_id=parent_id,
                            metric=metric, summaries=summaries)  # fmt: skip
        log_report(client, parent_id, page)
    except Exception as err:
        typer.echo(f"Warning: the comparison report was not logged: {first_line(err)}", err=True)


def create_parent(client, experiment_id: str, config, name: str, design: dict[str, str]) -> str:
    """The sweep's parent run: the config its children share (the budget) and the design
    (``sweep.*`` params); ``seed`` is left to the children, which each have their own."""
    from mlflow.entities import Param

    from kithara_ops.tracking.params import MAX_PARAM_LENGTH, MAX_PARAMS_PER_BATCH, shorten

    parent_id = client.create_run(
        experiment_id, run_name=name, tags={"kithara_ops.sweep": "true"}
    ).info.run_id
    shared = {k: v for k, v in config.to_dict().items() if k not in ("optimizer", "seed")}
    items = [(k, shorten(str(v), MAX_PARAM_LENGTH)) for k, v in {**shared, **design}.items()]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        batch = items[i : i + MAX_PARAMS_PER_BATCH]
        client.log_batch(parent_id, params=[Param(k, v) for k, v in batch])
    return parent_id
