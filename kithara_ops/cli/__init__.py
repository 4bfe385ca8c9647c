"""The ``kithara-ops`` command line (Typer). ``main`` is the console-script entry point.

Each command lives in its own module and registers itself on ``app`` when imported.
"""

from kithara_ops.cli import (  # noqa: F401
    checkpoints,
    compare,
    describe,
    export,
    launch,
    lr_find,
    report,
    resume,
    sweep,
    train,
    ui,
)
from kithara_ops.cli.app import app, main

__all__ = ["app", "main"]
