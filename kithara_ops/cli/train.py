"""``kithara-ops train``: build a run from options and train it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kithara_ops.cli.app import app, user_errors
from kithara_ops.cli.options import (
    CKPT,
    OPTIM,
    Coordinator,
    JsonOutput,
    LearningRate,
    NumProcesses,
    ProcessId,
    Quiet,
    ResetOptimizer,
    WeightDecay,
)
from kithara_ops.config import DEFAULT_STEPS, RunConfig, load_config
from kithara_ops.errors import ConfigError

CONFIG = "Config"
MODEL = "Model and data"
LOOP = "Training"
SHARD = "Sharding"
TRACK = "Tracking (MLflow)"


def _mesh_shape(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        data, fsdp = (int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise ConfigError(
            f"--mesh-shape {text!r} is not two sizes: write DATA,FSDP, e.g. 2,4."
        ) from None
    return data, fsdp


def resolve_config(config_file: Path | None, options: dict) -> RunConfig:
    """The run's config: the file's values (if any), then the options given, then defaults.

    Only options given on the command line (not ``None``) override the file, so a file plus
    a single flag changes that one setting.
    """
    base = load_config(config_file) if config_file is not None else RunConfig()
    return base.replace(**{k: v for k, v in options.items() if v is not None})


@app.command(
    epilog=(
        "Examples:\n\n"
        "  kithara-ops train\n\n"
        "  kithara-ops train --config run.yaml --steps 500\n\n"
        "  kithara-ops train --optimizer keras.AdamW --learning-rate 3e-4 --steps 500\n\n"
        "  kithara-ops train --model small --sharding fsdp --batch-size 16\n\n"
        "  kithara-ops launch --num-processes 2 -- train --sharding fsdp"
    )
)
@user_errors
def train(
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="A YAML or TOML file of train options (e.g. a run's config/run.yaml); options given here override it.",
            rich_help_panel=CONFIG,
        ),
    ] = None,
    print_config: Annotated[
        bool,
        typer.Option(
            "--print-config",
            help="Print the resolved config as YAML and exit.",
            rich_help_panel=CONFIG,
        ),
    ] = False,
    parent_run_id: Annotated[str | None, typer.Option(hidden=True)] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Built-in size (tiny, small) or module:function. (default: tiny)",
            rich_help_panel=MODEL,
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="stdlib, synthetic, a text file/dir/glob or a .jsonl file. (default: stdlib)",
            rich_help_panel=MODEL,
        ),
    ] = None,
    eval_data: Annotated[
        str | None,
        typer.Option(help="Evaluation data, same forms as --data.", rich_help_panel=MODEL),
    ] = None,
    seq_len: Annotated[
        int | None, typer.Option(help="Tokens per sequence. (default: 128)", rich_help_panel=MODEL)
    ] = None,
    optimizer: Annotated[
        str | None,
        typer.Option(
            help="optax.adamw, keras.AdamW, or a call such as 'optax.adamw(1e-3)'. (default: optax.adamw)",
            rich_help_panel=OPTIM,
        ),
    ] = None,
    learning_rate: LearningRate = None,
    weight_decay: WeightDecay = None,
    steps: Annotated[
        int | None,
        typer.Option(
            help=f"Total optimizer steps. (default: {DEFAULT_STEPS} unless --epochs)",
            rich_help_panel=LOOP,
        ),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(help="Passes over the data (instead of --steps).", rich_help_panel=LOOP),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Global batch size. (default: 8)", rich_help_panel=LOOP)
    ] = None,
    grad_accum_steps: Annotated[
        int | None, typer.Option(help="Micro-batches per step. (default: 1)", rich_help_panel=LOOP)
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(help="float32 or mixed_bfloat16. (default: float32)", rich_help_panel=LOOP),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Seed for weights, data order and dropout. (default: 0)", rich_help_panel=LOOP
        ),
    ] = None,
    log_every: Annotated[
        int | None,
        typer.Option(help="Report metrics every N steps. (default: 10)", rich_help_panel=LOOP),
    ] = None,
    eval_every: Annotated[
        int | None,
        typer.Option(help="Evaluate every N steps (and at the end).", rich_help_panel=LOOP),
    ] = None,
    eval_steps: Annotated[
        int | None,
        typer.Option(help="Batches per evaluation. (default: all)", rich_help_panel=LOOP),
    ] = None,
    sharding: Annotated[
        str | None,
        typer.Option(
            help="dp (replicate params) or fsdp (shard params). (default: dp)",
            rich_help_panel=SHARD,
        ),
    ] = None,
    mesh_shape: Annotated[
        str | None,
        typer.Option(
            help="DATA,FSDP device mesh, e.g. 2,4. (default: all devices on one axis)",
            rich_help_panel=SHARD,
        ),
    ] = None,
    checkpoint_dir: Annotated[
        str | None,
        typer.Option(
            help="Save Orbax checkpoints (with the optimizer state) here.", rich_help_panel=CKPT
        ),
    ] = None,
    save_every: Annotated[
        int | None, typer.Option(help="Save every N steps (and at the end).", rich_help_panel=CKPT)
    ] = None,
    keep: Annotated[
        int | None, typer.Option(help="Checkpoints to keep. (default: 3)", rich_help_panel=CKPT)
    ] = None,
    keep_best: Annotated[
        bool | None,
        typer.Option(
            "--keep-best/--keep-newest",
            help="Keep the lowest eval_loss ones instead of the newest.",
            rich_help_panel=CKPT,
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue from the newest checkpoint in --checkpoint-dir, if any.",
            rich_help_panel=CKPT,
        ),
    ] = False,
    reset_optimizer: ResetOptimizer = False,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            help="MLflow tracking URI. (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the current directory)",
            rich_help_panel=TRACK,
        ),
    ] = None,
    experiment: Annotated[
        str | None,
        typer.Option(
            help="MLflow experiment. (default: $MLFLOW_EXPERIMENT_NAME, else kithara-ops)",
            rich_help_panel=TRACK,
        ),
    ] = None,
    run_name: Annotated[
        str | None,
        typer.Option(
            help="MLflow run name. (default: the optimizer's label)", rich_help_panel=TRACK
        ),
    ] = None,
    tracking: Annotated[
        bool | None,
        typer.Option(
            "--tracking/--no-tracking", help="Log the run to MLflow.", rich_help_panel=TRACK
        ),
    ] = None,
    system_metrics: Annotated[
        bool | None,
        typer.Option(
            "--system-metrics/--no-system-metrics",
            help="Log CPU and memory use as MLflow system metrics.",
            rich_help_panel=TRACK,
        ),
    ] = None,
    log_model: Annotated[
        bool | None,
        typer.Option(
            "--log-model/--no-log-model",
            help="Log the trained model (MLflow Keras flavour).",
            rich_help_panel=TRACK,
        ),
    ] = None,
    coordinator: Coordinator = None,
    num_processes: NumProcesses = None,
    process_id: ProcessId = None,
    quiet: Quiet = False,
    json_output: JsonOutput = False,
) -> None:
    """Train a model: the built-in tiny transformer on the stdlib corpus by default."""
    from kithara_ops.build import build_trainer
    from kithara_ops.cli.progress import print_summary

    options = {
        "model": model,
        "data": data,
        "eval_data": eval_data,
        "seq_len": seq_len,
        "optimizer": optimizer,
        "learning_rate": learning_rate,
        "weight_decay": weight_decay,
        "steps": steps,
        "epochs": epochs,
        "batch_size": batch_size,
        "grad_accum_steps": grad_accum_steps,
        "precision": precision,
        "seed": seed,
        "log_every": log_every,
        "eval_every": eval_every,
        "eval_steps": eval_steps,
        "sharding": sharding,
        "mesh_shape": _mesh_shape(mesh_shape),
        "tracking_uri": tracking_uri,
        "experiment": experiment,
        "run_name": run_name,
        "tracking": tracking,
        "system_metrics": system_metrics,
        "log_model": log_model,
        "checkpoint_dir": checkpoint_dir,
        "save_every": save_every,
        "keep": keep,
        "keep_best": keep_best,
        "coordinator": coordinator,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    options["parent_run_id"] = parent_run_id
    config = resolve_config(config_file, options)
    if print_config:
        typer.echo(config.dump_yaml(), nl=False)
        return
    if (resume or reset_optimizer) and config.checkpoint_dir is None:
        raise ConfigError("--resume needs --checkpoint-dir DIR: the directory to resume from.")
    trainer = build_trainer(config, progress=not (quiet or json_output))
    result = trainer.train(resume=resume, reset_optimizer=reset_optimizer)
    print_summary(result, as_json=json_output)
