"""Reading a config file safely: the plain values of a YAML, TOML or JSON file.

A config file may come from anywhere (a download, a shared drive, a run's artifacts), so it
is read within limits before any of it is used: at most ``MAX_BYTES`` bytes, values nested at
most ``MAX_DEPTH`` levels, and YAML without anchors or aliases, which let a few hundred bytes
expand into billions of values. Every refusal is one ``ConfigError`` line naming the file,
the reason and the fix.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import yaml

from kithara_ops.errors import ConfigError, first_line

MAX_BYTES = 1 << 20
"""Largest config file read (1 MiB); a run's config is a few hundred bytes."""
MAX_DEPTH = 16
"""Deepest nesting of values read; a run's config nests three (a mapping of lists of numbers)."""


class _Refused(Exception):
    """A reason a file is refused, with its fix (raised from inside the YAML loader)."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(reason)
        self.reason, self.fix = reason, fix


class StrictYamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses anchors and aliases and nesting past ``MAX_DEPTH``.

    Both are checked while composing the node graph, before any value is built, so a YAML
    "billion laughs" is refused at its first anchor instead of being expanded.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        """Compose one node after checking it has no anchor, is no alias and is not too deep."""
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(
                f"it uses a YAML anchor or alias (&name, *name) on line {line}",
                "write each value out in full",
            )
        if self._depth >= MAX_DEPTH:
            raise _Refused(
                f"its values nest more than {MAX_DEPTH} levels deep (line {line})",
                "write the options as flat option: value lines",
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def read_values(path: Path) -> Any:
    """The values a config file holds (not yet checked to be a mapping of options).

    ``.toml`` and ``.json`` files are read as such, anything else as YAML.

    Raises:
      ConfigError: the file is missing, too large, not UTF-8, not valid, or refused by a limit.
    """
    name = repr(str(path))
    if not path.exists():
        raise ConfigError(f"Config file {name} does not exist: check the path.")
    if not path.is_file():
        raise ConfigError(f"Config file {name} is not a file: pass the path of a file.")
    size = path.stat().st_size
    if size <= MAX_BYTES:
        with path.open("rb") as stream:
            data = stream.read(MAX_BYTES + 1)  # the file may have grown since stat()
        size = max(size, len(data))
    if size > MAX_BYTES:
        raise ConfigError(
            f"Config file {name} is refused: it is larger than {MAX_BYTES >> 20} MiB "
            f"({size:,} bytes); pass a file of option: value lines, such as a run's "
            "config/run.yaml."
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"Config file {name} is not UTF-8 text: save it as UTF-8.") from None
    suffix = path.suffix.lower()
    try:
        if suffix in (".toml", ".json"):
            values = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
            _check_depth(values)
        else:
            values = yaml.load(text, Loader=StrictYamlLoader) or {}  # a SafeLoader, stricter
    except _Refused as refused:
        raise ConfigError(
            f"Config file {name} is refused: {refused.reason}; {refused.fix}."
        ) from None
    except RecursionError:
        raise ConfigError(
            f"Config file {name} is refused: its values nest too deeply; write the options as "
            "flat option: value lines."
        ) from None
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"Config file {name} is not valid: {first_line(err)}") from None
    except ValueError:  # an integer past Python's limit on digits converted from text
        raise ConfigError(
            f"Config file {name} is refused: it holds a number too long to read; write "
            "numbers of ordinary size."
        ) from None
    return values


def _check_depth(value: Any, depth: int = 1) -> None:
    """Refuse values nested deeper than ``MAX_DEPTH`` (in TOML and JSON; YAML checks as it reads)."""
    if depth > MAX_DEPTH:
        raise _Refused(
            f"its values nest more than {MAX_DEPTH} levels deep",
            "write the options as flat option: value lines",
        )
    children = value.values() if isinstance(value, dict) else value
    if isinstance(value, dict | list):
        for child in children:
            _check_depth(child, depth + 1)
