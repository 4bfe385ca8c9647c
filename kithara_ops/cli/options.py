"""Options that several commands share, declared once as ``Annotated`` aliases.

A command uses them as ``quiet: Quiet = False``; the name, help text and help panel are the
same wherever they appear.
"""

from __future__ import annotations

from typing import Annotated

import typer

OPTIM = "Optimizer"
CKPT = "Checkpoints (Orbax)"
DIST = "Distributed"
OUTPUT = "Output"

LearningRate = Annotated[
    float | None,
    typer.Option(
        help="Learning rate for a bare optimizer name. (default: 1e-3)", rich_help_panel=OPTIM
    ),
]
WeightDecay = Annotated[
    float | None,
    typer.Option(help="Weight decay for a bare optimizer name.", rich_help_panel=OPTIM),
]
ResetOptimizer = Annotated[
    bool,
    typer.Option(
        "--reset-optimizer",
        help="When resuming: keep weights and step, start a fresh optimizer state.",
        rich_help_panel=CKPT,
    ),
]
Coordinator = Annotated[
    str | None,
    typer.Option(
        help="Process 0's HOST:PORT, for a multi-process run (with the two options below).",
        rich_help_panel=DIST,
    ),
]
NumProcesses = Annotated[
    int | None,
    typer.Option(help="How many processes take part in the run.", rich_help_panel=DIST),
]
ProcessId = Annotated[
    int | None,
    typer.Option(help="This process's rank: 0 to num-processes - 1.", rich_help_panel=DIST),
]
Quiet = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar.", rich_help_panel=OUTPUT)
]
JsonOutput = Annotated[
    bool,
    typer.Option("--json", help="Print the result as one JSON object.", rich_help_panel=OUTPUT),
]
