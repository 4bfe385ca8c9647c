"""``kithara-ops resume``: continue a checkpointed run where it stopped."""

from __future__ import annotations

from typing import Annotated

import typer

from kithara_ops.cli.app import app, user_errors
from kithara_ops.cli.options import (
    Coordinator,
    JsonOutput,
    NumProcesses,
    ProcessId,
    Quiet,
    ResetOptimizer,
)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  kithara-ops resume runs/tiny\n\n"
        "  kithara-ops resume runs/tiny --steps 2000\n\n"
        "  kithara-ops resume runs/chat --data moved/chat.jsonl --chat-template moved/t.jinja\n\n"
        "  kithara-ops resume runs/tiny --optimizer 'optax.adamw(3e-4)' --reset-optimizer\n\n"
        "  kithara-ops resume runs/stopped --early-stop-patience 10 --steps 4000"
    )
)
@user_errors
def resume(
    checkpoint_dir: Annotated[str, typer.Argument(help="The run's checkpoint directory.")],
    steps: Annotated[
        int | None, typer.Option(help="The run's new total step count (not extra steps).")
    ] = None,
    optimizer: Annotated[
        str | None, typer.Option(help="Continue with this optimizer spec instead of the saved one.")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="The run's model named again: its module:function factory (a checkpoint "
            "never runs code it names) or its preset folder where it is now."
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(help="The run's training data, where it is now (the same tokens)."),
    ] = None,
    eval_data: Annotated[
        str | None, typer.Option(help="The run's evaluation data, where it is now.")
    ] = None,
    chat_template: Annotated[
        str | None, typer.Option(help="The run's chat template file, where it is now.")
    ] = None,
    early_stop_patience: Annotated[
        int | None,
        typer.Option(
            help="A new early-stopping patience: a run that stopped early trains on with a "
            "larger one (its count continues from the checkpoint)."
        ),
    ] = None,
    target_eval_loss: Annotated[
        float | None, typer.Option(help="A new target eval_loss (e.g. lower than the one reached).")
    ] = None,
    reset_optimizer: ResetOptimizer = False,
    quiet: Quiet = False,
    json_output: JsonOutput = False,
    coordinator: Coordinator = None,
    num_processes: NumProcesses = None,
    process_id: ProcessId = None,
) -> None:
    """Continue a run from its newest checkpoint, in the same MLflow run.

    Weights, optimizer state, step, data position and RNG come from the checkpoint; the
    model, data and optimizer are rebuilt from the run's saved config. Inputs that moved are
    named again with --data, --eval-data, --chat-template and --model; the data must give
    the tokens the run trained on, and a preset the weights it started from.
    """
    from kithara_ops.build import resume as resume_run
    from kithara_ops.cli.progress import print_summary, stdout_for_json
    from kithara_ops.optim.spec import build_optimizer

    built = build_optimizer(optimizer) if optimizer else None
    named = {"model": model, "data": data, "eval_data": eval_data, "chat_template": chat_template,
             "early_stop_patience": early_stop_patience, "target_eval_loss": target_eval_loss}  # fmt: skip
    with stdout_for_json(json_output):
        result = resume_run(
            checkpoint_dir,
            steps,
            built,
            reset_optimizer=reset_optimizer,
            progress=not (quiet or json_output),
            coordinator=coordinator,
            num_processes=num_processes,
            process_id=process_id,
            **{name: value for name, value in named.items() if value is not None},
        )
    print_summary(result, as_json=json_output)
