"""What each ``RunConfig`` field means to a user: its help text, help panel and CLI form.

Every field of ``RunConfig`` is declared with ``option(default, help, panel, ...)``, which
stores an ``Option`` in the field's metadata. The ``train`` command builds one command-line
option per field from it, and ``RunConfig``'s docstring lists the same texts, so a field's
default, help and flag are written once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

from kithara_ops.errors import ConfigError

Panel = Literal[
    "Model and data",
    "Optimizer",
    "Training",
    "Sharding",
    "Checkpoints (Orbax)",
    "Tracking (MLflow)",
    "Distributed",
]
"""The help panels that group ``kithara-ops train``'s options."""

MODEL: Panel = "Model and data"
OPTIM: Panel = "Optimizer"
LOOP: Panel = "Training"
SHARD: Panel = "Sharding"
CKPT: Panel = "Checkpoints (Orbax)"
TRACK: Panel = "Tracking (MLflow)"
DIST: Panel = "Distributed"

OPTION_KEY = "kithara_ops.option"
"""The key of a field's ``Option`` in its ``dataclasses.Field.metadata``."""


@dataclasses.dataclass(frozen=True)
class Option:
    """How a config field reads and shows to a user.

    Attributes:
      help: what the field means, one or two plain sentences (no markup: the same text
        serves the command line and the docs).
      panel: the help panel of its ``train`` option (every field is one).
      flags: the option's declaration when the default one is not wanted, e.g.
        ``"--keep-best/--keep-newest"``; by default a boolean is ``--name/--no-name`` and any
        other field ``--name``.
      parser: turns the option's text into the field's value (raising ``ConfigError``), for
        a field that is not a plain ``str``, ``int``, ``float`` or ``bool``.
      metavar: the placeholder shown for the option's value in ``--help``.
      default_text: shown as ``(default: ...)`` instead of the field's default, for a
        default of ``None`` that still resolves to a value.
    """

    help: str
    panel: Panel | None = None
    flags: str | None = None
    parser: Callable[[str], Any] | None = None
    metavar: str | None = None
    default_text: str | None = None

    def __post_init__(self) -> None:
        if self.panel is None:
            raise TypeError("an option shown on the command line needs a help panel")


def option(default: Any, help: str, panel: Panel | None = None, **cli: Any) -> Any:
    """A dataclass field with ``default`` whose metadata holds ``Option(help, panel, **cli)``.

    Use it as ``batch_size: int = option(8, "Global batch size.", LOOP)``.
    """
    return dataclasses.field(
        default=default, metadata={OPTION_KEY: Option(help=help, panel=panel, **cli)}
    )


def field_option(field: dataclasses.Field) -> Option:
    """The ``Option`` of a field declared with ``option(...)``."""
    try:
        return field.metadata[OPTION_KEY]
    except KeyError:
        raise TypeError(f"field {field.name!r} is not declared with option(...)") from None


def parse_mesh_shape(text: str) -> tuple[int, int]:
    """``"2,4"`` or ``"2x4"`` as the ``(data, fsdp)`` mesh shape ``(2, 4)``.

    Only the form is checked here; ``RunConfig`` refuses sizes below 1.

    Raises:
      ConfigError: ``text`` is not two whole numbers.
    """
    parts = text.lower().replace("x", ",").split(",")
    try:
        data, fsdp = (int(part) for part in parts)
    except ValueError:
        raise ConfigError(
            f"mesh_shape {text!r} is not two sizes: write DATA,FSDP, e.g. 2,4 (or 2x4)."
        ) from None
    return data, fsdp


def attributes_doc(cls: type) -> str:
    """An ``Attributes:`` section listing each field of dataclass ``cls`` with its help."""
    lines = ["Attributes:"]
    for field in dataclasses.fields(cls):
        lines.append(f"  {field.name}: {field_option(field).help}")
    return "\n".join(lines)
