"""The ``kithara-ops`` command line (Typer). ``main`` is the console-script entry point.

Each command lives in its own module and registers itself on ``app`` when imported.
"""

from kithara_ops.cli import checkpoints, compare, resume, sweep, train  # noqa: F401  (register commands)
from kithara_ops.cli.app import app, main

__all__ = ["app", "main"]
