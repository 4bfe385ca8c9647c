"""``kithara-ops export``: a checkpoint's trained model as a KerasHub preset, HF or .keras."""

from __future__ import annotations

from typing import Annotated

import typer

from kithara_ops.cli.app import app, user_errors

_EXAMPLE = (
    "Examples:\n\n"
    "  kithara-ops export runs/gemma-lora --out exported/gemma    # a KerasHub preset\n\n"
    "  kithara-ops export runs/gemma-lora --format hf --out exported/gemma-hf --step 400\n\n"
    "  kithara-ops export runs/tiny --format keras --out exported/tiny\n\n"
    "  kithara-ops export runs/gemma-lora --format peft --out exported/gemma-adapter"
)


@app.command(epilog=_EXAMPLE)
@user_errors
def export(
    checkpoint_dir: Annotated[str, typer.Argument(help="The run's checkpoint directory.")],
    out: Annotated[str, typer.Option("--out", help="A new folder to write the model to.")],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="keras-hub (a preset folder), hf (Hugging Face safetensors), keras "
            "(a model.keras file) or peft (a LoRA run's adapters as a PEFT folder).",
        ),
    ] = "keras-hub",
    step: Annotated[
        int | None, typer.Option("--step", help="The checkpoint to export (default: newest).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="The model named again: its factory, for a run built by one, or its preset "
            "folder where it is now.",
        ),
    ] = None,
    chat_template: Annotated[
        str | None,
        typer.Option("--chat-template", help="The run's chat template file, where it is now."),
    ] = None,
) -> None:
    """Write a checkpoint's trained model (LoRA merged, or its adapters alone) where other
    tools load it."""
    from kithara_ops.export import export as export_model

    written = export_model(
        checkpoint_dir, out, format=format, step=step, model=model, chat_template=chat_template
    )
    typer.echo(f"Exported {checkpoint_dir} ({format}) to {written}")
