"""The Typer application: global options, error handling and exit codes.

Exit codes: 0 success, 1 training failure, 2 usage error (a bad option or value: one line on
stderr, no traceback), 130 interrupted.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import Annotated, Any

import click
import typer

from kithara_ops._backend import require_jax_backend

require_jax_backend()

from kithara_ops.errors import (  # noqa: E402
    CheckpointWriteError,
    ConfigError,
    Diverged,
    StoreFailed,
)
from kithara_ops.interrupt import TrainingStopped  # noqa: E402

try:  # Typer 0.2x carries its own copy of click, with its own exception classes.
    from typer._click.exceptions import UsageError as _TyperUsageError
except ImportError:  # pragma: no cover - a Typer built on the click package
    _TyperUsageError = click.UsageError

USAGE_ERRORS = (click.UsageError, _TyperUsageError)
"""A bad option or value as the command-line parser reports it, whichever click raised it."""

app = typer.Typer(
    name="kithara-ops",
    help="Comparable, resumable, observable fine-tuning runs for Keras 3 models on JAX.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``message`` as one line on stderr and return the ``Exit`` to raise."""
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(code)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ``ConfigError`` into a one-line message and exit code 2; ``Diverged``,
    ``CheckpointWriteError`` and ``StoreFailed`` into one line and exit code 1; a stop on a
    signal into 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), as shells
    report it."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ConfigError as err:
            _traceback_with_debug()
            raise fail(str(err)) from None
        except (Diverged, CheckpointWriteError, StoreFailed) as failed:
            _traceback_with_debug()
            raise fail(str(failed), 1) from None
        except TrainingStopped as stopped:
            typer.echo(f"{stopped}; the state was saved where the run checkpoints.", err=True)
            raise typer.Exit(128 + stopped.signum) from None
        except KeyboardInterrupt:
            raise fail("interrupted.", 130) from None

    return wrapper


def _traceback_with_debug() -> None:
    """With ``--debug``, the traceback of the error being handled, before its one line."""
    if DEBUG.on:
        traceback.print_exc()


def _version(value: bool) -> None:
    if value:
        from kithara_ops import __version__

        typer.echo(f"kithara-ops {__version__}")
        raise typer.Exit()


class DEBUG:
    """Whether ``--debug`` was given."""

    on = False


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            help="Show tracebacks, and the log lines libraries (Orbax, TensorStore) print "
            "when something fails; without it each fault is one line.",
        ),
    ] = False,
) -> None:
    """Train Keras 3 models on JAX with Keras or Optax optimizers, tracked in MLflow."""
    DEBUG.on = debug
    if not debug:
        from kithara_ops.cli.noise import quiet_libraries

        quiet_libraries()


def main() -> None:
    """Console-script entry point.

    The current directory goes first on the import path, as ``python -m`` puts it there, so
    ``--model my_models:build`` finds ``./my_models.py`` from either way of starting.
    """
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, "")
    sys.exit(app())
