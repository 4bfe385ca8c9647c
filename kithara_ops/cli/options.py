"""Command-line options: one per ``RunConfig`` field, plus the few that several commands share.

The config options are generated from the fields of ``RunConfig`` (their ``option(...)``
metadata in ``kithara_ops.config``): the flag, help text, help panel and the default shown
in ``--help`` come from the field, so they cannot drift from it. Every generated option
defaults to ``None``, "not given", so that only options given on the command line override
a config file (see ``config_values``).

A command uses an option as ``quiet: Quiet = False``; the name, help text and help panel are
the same wherever they appear.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from kithara_ops.config import RunConfig, field_types
from kithara_ops.config.fields import CKPT, Option, field_option
from kithara_ops.errors import ConfigError

OUTPUT = "Output"

F = TypeVar("F", bound=Callable[..., Any])


def cli_fields() -> dict[str, dataclasses.Field]:
    """The ``RunConfig`` fields, each a command-line option, in order."""
    return {f.name: f for f in dataclasses.fields(RunConfig)}


def _value_type(name: str, spec: Option) -> type:
    """The type click parses the option's text as (``str`` when the field has a parser)."""
    if spec.parser is not None:
        return str
    hint = field_types()[name]
    if isinstance(hint, types.UnionType):  # ``int | None``: the option itself is never None
        hint = next(arg for arg in hint.__args__ if arg is not type(None))
    if typing.get_origin(hint) is typing.Literal:
        # A plain string: RunConfig refuses other values with one line naming the choices,
        # where click's own choice error would print a usage block.
        return str
    if hint not in (str, int, float, bool):
        raise TypeError(f"RunConfig.{name} ({hint}) needs a parser=... in its option(...)")
    return hint


def _default_text(field: dataclasses.Field, spec: Option) -> str | None:
    """What ``--help`` shows as the field's default, from the dataclass itself."""
    if spec.default_text is not None:
        return spec.default_text
    default = field.default
    if default is None:  # the field's help says what None means
        return None
    if isinstance(default, bool):  # the flag in effect
        on, _, off = _declaration(field.name, spec).partition("/")
        return on if default else off
    if isinstance(default, float):
        return f"{default:g}"
    return str(default)


def _declaration(name: str, spec: Option) -> str:
    """The option's flags: its own, else ``--name/--no-name`` for a boolean, else ``--name``."""
    if spec.flags is not None:
        return spec.flags
    flag = name.replace("_", "-")
    return f"--{flag}/--no-{flag}" if _value_type(name, spec) is bool else f"--{flag}"


def option_help(name: str) -> str:
    """The ``--help`` text of field ``name``'s option: its help, then its default."""
    field = cli_fields()[name]
    spec = field_option(field)
    default = _default_text(field, spec)
    return spec.help if default is None else f"{spec.help} (default: {default})"


def config_option(name: str) -> Any:
    """``Annotated[T | None, typer.Option(...)]`` for field ``name`` of ``RunConfig``.

    Use it as a parameter's annotation with the default ``None``: ``lr: LearningRate = None``.
    """
    field = cli_fields()[name]
    spec = field_option(field)
    info = typer.Option(
        _declaration(name, spec),
        help=option_help(name),
        rich_help_panel=spec.panel,
        metavar=spec.metavar,
        show_default=False,
    )
    return Annotated[_value_type(name, spec) | None, info]


def with_config_options(after: str) -> Callable[[F], F]:
    """Give a command that takes ``**config`` one keyword option per ``RunConfig`` field.

    The generated parameters replace ``**config`` in the command's signature (which is what
    Typer reads), placed after the parameter named ``after`` so that ``--help`` lists the
    panels in a sensible order. The command is then called with every field's option as a
    keyword: its value, or ``None`` when the option was not given; pass them to
    ``config_values``.
    """

    def decorate(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in signature.parameters.values()
            if p.kind is not p.VAR_KEYWORD
        ]
        clash = {p.name for p in own} & set(cli_fields())
        if clash:
            raise TypeError(f"{command.__name__} declares config options itself: {sorted(clash)}")
        generated = [
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=config_option(name)
            )
            for name in cli_fields()
        ]
        cut = [p.name for p in own].index(after) + 1
        command.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[*own[:cut], *generated, *own[cut:]]
        )
        return command

    return decorate


def config_values(options: dict[str, Any]) -> dict[str, Any]:
    """The ``RunConfig`` values of the config options given (not ``None``), parsed.

    ``options`` may hold other parameters of the command too; they are left out.

    Raises:
      ConfigError: an option's text is refused by its field's parser (e.g. ``--mesh-shape``).
    """
    values = {}
    for name, field in cli_fields().items():
        value = options.get(name)
        if value is None:
            continue
        spec = field_option(field)
        if spec.parser is not None:
            try:
                value = spec.parser(value)
            except ConfigError as err:
                flag = _declaration(name, spec).partition("/")[0]
                raise ConfigError(f"{flag}: {err}") from None
        values[name] = value
    return values


LearningRate = config_option("learning_rate")
WeightDecay = config_option("weight_decay")
Coordinator = config_option("coordinator")
NumProcesses = config_option("num_processes")
ProcessId = config_option("process_id")
ResetOptimizer = Annotated[
    bool,
    typer.Option(
        "--reset-optimizer",
        help="When resuming: keep weights and step, start a fresh optimizer state.",
        rich_help_panel=CKPT,
    ),
]
Quiet = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar.", rich_help_panel=OUTPUT)
]
JsonOutput = Annotated[
    bool,
    typer.Option("--json", help="Print the result as one JSON object.", rich_help_panel=OUTPUT),
]
