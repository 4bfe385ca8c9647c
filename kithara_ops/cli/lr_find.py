"""``kithara-ops lr-find``: a learning-rate range test for any Keras or Optax optimizer."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from kithara_ops.cli.app import app, user_errors
from kithara_ops.cli.sweep_runs import train_options
from kithara_ops.errors import ConfigError


@app.command(
    "lr-find",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog=(
        "Any train option may follow (model, data, batch size...).\n\n"
        "Examples:\n\n"
        "  kithara-ops lr-find --optimizer 'optax.adamw(1e-3, weight_decay=0.1)'\n\n"
        "  kithara-ops lr-find --optimizer 'keras.optimizers.Adam' --start-lr 1e-6 --end-lr 1"
        " --steps 200 --json"
    ),
)
@user_errors
def lr_find(
    ctx: typer.Context,
    start_lr: Annotated[float, typer.Option(help="The first step's learning rate.")] = 1e-7,
    end_lr: Annotated[float, typer.Option(help="The last step's learning rate.")] = 10.0,
    steps: Annotated[int, typer.Option(help="Steps from --start-lr to --end-lr.")] = 100,
    divergence: Annotated[
        float, typer.Option(help="Stop once the loss exceeds this many times its best.")
    ] = 4.0,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Grow the learning rate exponentially from a fresh state, one step at a time, until
    the loss blows up; print the suggested rate (the steepest descent of the smoothed loss)
    and log the loss-against-rate chart to MLflow. The model's weights are left as they were."""
    from kithara_ops.cli.progress import stdout_for_json
    from kithara_ops.cli.train import resolve_config
    from kithara_ops.lr_find import lr_find as range_test

    params = train_options(ctx.args)
    for refused in ("steps", "epochs", "resume", "checkpoint_dir", "parent_run_id", "coordinator"):
        if params.get(refused):
            raise ConfigError(f"--{refused.replace('_', '-')} cannot be used with lr-find.")
    config = resolve_config(params.get("config_file"), params)
    with stdout_for_json(json_output):
        test = range_test(config, start_lr=start_lr, end_lr=end_lr, steps=steps,
                          divergence=divergence)  # fmt: skip
    if config.tracking:
        test.run_id = _log(config, test, start_lr, end_lr, steps, divergence)
    if json_output:
        print(json.dumps(test.to_dict(), allow_nan=False))
        return
    typer.echo(f"{len(test.losses)} steps ({test.stopped}); lowest smoothed loss at lr "
               f"{test.min_loss_learning_rate:.3g}")  # fmt: skip
    typer.echo(f"suggested learning rate: {test.suggested_learning_rate:.3g}")
    typer.echo(f"search around it: --space '{test.space()}'")
    if test.run_id:
        typer.echo(f"MLflow run: {test.run_id}")


def _log(config, test, start_lr, end_lr, steps, divergence) -> str:
    from mlflow import MlflowClient

    from kithara_ops.tracking import experiments
    from kithara_ops.tracking.range_test import log_range_test
    from kithara_ops.tracking.tracker import resolve_experiment

    client = MlflowClient(config.tracking_uri)
    experiment_id = experiments.experiment_id(client, resolve_experiment(config), create=True)
    keep = ("model", "data", "batch_size", "seq_len", "seed", "sharding", "optimizer")
    params = {name: getattr(config, name) for name in keep}
    params.update({"lr_find.start_lr": start_lr, "lr_find.end_lr": end_lr,
                   "lr_find.steps": steps, "lr_find.divergence": divergence,
                   "lr_find.stopped": test.stopped})  # fmt: skip
    return log_range_test(client, experiment_id, config, test, params)
