"""``kithara-ops checkpoints``: what a checkpoint directory holds."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from kithara_ops.cli.app import app, user_errors
from kithara_ops.errors import ConfigError


def _size(path: Path) -> int:
    """Bytes under ``path``; files deleted while they are counted count nothing."""
    total = 0
    for file in path.rglob("*"):
        with contextlib.suppress(FileNotFoundError):
            total += file.stat().st_size if file.is_file() else 0
    return total


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


@app.command(epilog="Example:\n\n  kithara-ops checkpoints runs/tiny --json")
@user_errors
def checkpoints(
    checkpoint_dir: Annotated[str, typer.Argument(help="A checkpoint directory.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON list.")] = False,
) -> None:
    """List a directory's checkpoints: step, time, loss, optimizer and size."""
    from kithara_ops.checkpoint.checkpointer import Checkpointer

    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise ConfigError(f"Checkpoint directory {checkpoint_dir!r} does not exist.")
    checkpointer = Checkpointer(root)
    rows = []
    for step in checkpointer.steps():
        try:
            record = checkpointer.read_record(step)
        except Exception:  # a damaged checkpoint is listed as such, not hidden
            record = None
        size = _size(root / str(step))
        if not (root / str(step)).exists():
            continue  # deleted as it was read: a run writing here rotated it away
        rows.append(
            {
                "step": step,
                "saved_at": record.saved_at if record else None,
                "loss": record.loss if record else None,
                "eval_loss": record.eval_loss if record else None,
                "optimizer": record.optimizer.get("label") if record else None,
                "run_uid": record.run_uid if record else None,
                "bytes": size,
                "damaged": record is None,
            }
        )
    if json_output:
        print(json.dumps(rows))
        return
    table = Table(title=f"checkpoints in {root}")
    for column in ("step", "saved at", "loss", "eval loss", "optimizer", "size"):
        table.add_column(column)
    for row in rows:
        loss = (
            "damaged"
            if row["damaged"]
            else (f"{row['loss']:.4f}" if row["loss"] is not None else "-")
        )
        eval_loss = f"{row['eval_loss']:.4f}" if row["eval_loss"] is not None else "-"
        table.add_row(
            str(row["step"]),
            row["saved_at"] or "-",
            loss,
            eval_loss,
            row["optimizer"] or "-",
            _human(row["bytes"]),
        )
    Console().print(table)
