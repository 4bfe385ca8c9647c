"""Search spaces over optimizer specs: ``$name`` placeholders, distributions and grids.

A spec names what a search tunes with placeholders, ``optax.adamw(learning_rate=$lr, b2=$b2)``;
``--space 'lr=loguniform(1e-5,1e-2)'`` says how a search samples ``lr`` and
``--grid 'lr=1e-4,3e-4,1e-3'`` lists the values a grid tries. Both are parsed with ``ast``
and only literal numbers (and, in ``choice``, strings and booleans) are accepted: nothing in
them runs. A trial's spec is the template with each placeholder replaced by the literal
``repr`` of its value, then parsed and checked like any other spec.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from kithara_ops.errors import ConfigError

PLACEHOLDER = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_FORMS = "loguniform(LOW,HIGH), uniform(LOW,HIGH), int(LOW,HIGH), choice(A,B,...) or lr-find"
LR_FIND = "lr-find"
"""The space of a learning rate found by a range test: ``loguniform(s / 10, s * 10)``
around each optimizer's own suggestion ``s``."""


@dataclasses.dataclass(frozen=True)
class Distribution:
    """How a search samples one hyperparameter.

    Attributes:
      kind: ``loguniform`` (``log x`` uniform on ``[log low, log high]``), ``uniform``,
        ``int`` (whole numbers in ``[low, high]``), ``choice`` (one of ``values``) or
        ``lr-find`` (a ``loguniform`` each optimizer's range test decides, before the search).
      low, high: the bounds of the numeric kinds, ``low < high``.
      values: the options of ``choice``.
    """

    kind: str
    low: float | None = None
    high: float | None = None
    values: tuple = ()

    def representative(self) -> Any:
        """A value inside the space, to check a template builds before any trial."""
        if self.kind == "choice":
            return self.values[0]
        if self.kind == LR_FIND:
            return 1e-3
        if self.kind == "loguniform":
            return math.sqrt(self.low * self.high)
        middle = (self.low + self.high) / 2
        return int(middle) if self.kind == "int" else middle

    def suggest(self, trial: Any, name: str) -> Any:
        """The value an Optuna ``trial`` samples for ``name``."""
        if self.kind == "choice":
            return trial.suggest_categorical(name, list(self.values))
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high))
        return trial.suggest_float(name, self.low, self.high, log=self.kind == "loguniform")

    def __str__(self) -> str:
        if self.kind == LR_FIND:
            return LR_FIND
        args = self.values if self.kind == "choice" else (self.low, self.high)
        return f"{self.kind}({','.join(repr(a) for a in args)})"


def _split(text: str, flag: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name.isidentifier() or not value.strip():
        raise ConfigError(
            f"{flag} {text!r} is not NAME=VALUE: write e.g. {flag} 'lr=...' for a spec "
            "that says $lr."
        )
    return name, value.strip()


def _literal(node: ast.expr, text: str, flag: str, kinds: tuple = (int, float)) -> Any:
    """A literal number (or a string or boolean where ``kinds`` allows), else a refusal."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = _literal(node.operand, text, flag, (int, float))
        return -value
    value = node.value if isinstance(node, ast.Constant) else None
    if type(value) not in kinds or (isinstance(value, float) and not math.isfinite(value)):
        shown = ast.get_source_segment(text, node) or ast.dump(node)
        raise ConfigError(
            f"{flag} {text!r}: {shown!r} is not a literal value; nothing in a space runs, "
            f"so write numbers, e.g. {flag} 'lr=1e-4,3e-4'."
        )
    return value


def parse_space(text: str) -> tuple[str, Distribution]:
    """``'lr=loguniform(1e-5,1e-2)'`` -> ``("lr", Distribution("loguniform", 1e-5, 1e-2))``.

    Raises:
      ConfigError: not ``NAME=FORM(...)`` with literal arguments, or bounds out of order.
    """
    name, value = _split(text, "--space")
    if value == LR_FIND:
        return name, Distribution(LR_FIND)
    try:
        node = ast.parse(value, mode="eval").body
    except SyntaxError:
        node = None
    kind = node.func.id if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) else None
    if kind not in ("loguniform", "uniform", "int", "choice") or node.keywords:
        raise ConfigError(f"--space {text!r} is not a distribution: write NAME={_FORMS}.")
    if kind == "choice":
        values = tuple(_literal(a, value, "--space", (int, float, str, bool)) for a in node.args)
        if len(values) < 2 or len(set(values)) != len(values):
            raise ConfigError(f"--space {text!r}: choice needs two or more distinct values.")
        return name, Distribution("choice", values=values)
    if len(node.args) != 2:
        raise ConfigError(f"--space {text!r}: {kind} takes two bounds, {kind}(LOW,HIGH).")
    low, high = (_literal(a, value, "--space") for a in node.args)
    if not low < high or (kind == "loguniform" and low <= 0):
        need = "0 < LOW < HIGH" if kind == "loguniform" else "LOW < HIGH"
        raise ConfigError(f"--space {text!r}: the bounds must satisfy {need}.")
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"--space {text!r}: int takes whole-number bounds.")
    return name, Distribution(kind, low, high)


def parse_grid(text: str) -> tuple[str, tuple]:
    """``'lr=1e-4,3e-4,1e-3'`` -> ``("lr", (1e-4, 3e-4, 1e-3))``: literal values only."""
    name, value = _split(text, "--grid")
    try:
        node = ast.parse(f"({value},)", mode="eval").body
    except SyntaxError:
        node = None
    if not isinstance(node, ast.Tuple):
        raise ConfigError(f"--grid {text!r} is not a list of values: write e.g. 'lr=1e-4,3e-4'.")
    values = tuple(_literal(e, value, "--grid", (int, float, str, bool)) for e in node.elts)
    if len(set(values)) != len(values):
        raise ConfigError(f"--grid {text!r} repeats a value: list each once.")
    return name, values


def placeholders(spec: str) -> list[str]:
    """The ``$names`` of ``spec``, each once, in order of appearance."""
    return list(dict.fromkeys(PLACEHOLDER.findall(spec)))


def fill(spec: str, values: Mapping[str, Any]) -> str:
    """``spec`` with each ``$name`` of ``values`` replaced by the literal of its value (the
    other placeholders are left as they are)."""
    return PLACEHOLDER.sub(lambda m: repr(values[m[1]]) if m[1] in values else m[0], spec)


@dataclasses.dataclass(frozen=True)
class SearchDesign:
    """What a search tunes: per optimizer template, its placeholders, and how each is tried.

    Attributes:
      templates: the optimizer specs, with ``$name`` placeholders.
      spaces: ``name -> Distribution`` for a sampled search (``--space``).
      grid: ``name -> values`` for a grid (``--grid``).
      trials: the sampled trials each template gets (``--trials``); ``None`` for a grid.
    """

    templates: tuple[str, ...]
    spaces: Mapping[str, Distribution]
    grid: Mapping[str, tuple]
    trials: int | None = None
    decided: Mapping[str, Mapping[str, Distribution]] = dataclasses.field(default_factory=dict)

    def space_for(self, template: str) -> dict[str, Distribution]:
        """``template``'s spaces: the shared ones, with those decided for it (``lr-find``)."""
        return {**self.spaces, **self.decided.get(template, {})}

    @property
    def searched(self) -> bool:
        """Whether any template has a placeholder (otherwise a plain sweep)."""
        return any(placeholders(t) for t in self.templates)

    def grid_points(self, template: str) -> Iterator[dict[str, Any]]:
        """Every combination of the grid values of ``template``'s placeholders."""
        names = placeholders(template)
        for combo in itertools.product(*(self.grid[n] for n in names)):
            yield dict(zip(names, combo))

    def representative(self, template: str) -> dict[str, Any]:
        """One value per placeholder of ``template``, inside its space or grid."""
        return {
            n: self.grid[n][0] if n in self.grid else self.space_for(template)[n].representative()
            for n in placeholders(template)
        }

    def params(self) -> dict[str, str]:
        """The design as MLflow params of the sweep's parent run."""
        out = {f"sweep.space.{n}": str(d) for n, d in self.spaces.items()}
        for i, template in enumerate(self.templates):
            out.update(
                {f"sweep.space.{n}.{i}": str(d) for n, d in self.decided.get(template, {}).items()}
            )
        out.update({f"sweep.grid.{n}": ",".join(map(repr, v)) for n, v in self.grid.items()})
        if self.trials is not None:
            out["sweep.trials"] = str(self.trials)
        return out


def search_design(templates: Sequence[str], spaces: Sequence[str], grid: Sequence[str],
                  trials: int | None) -> SearchDesign:  # fmt: skip
    """Parse and check ``--space`` / ``--grid`` against the templates' placeholders.

    Raises:
      ConfigError: a malformed or repeated entry; a placeholder with no space (or grid); a
        space that no template names; a grid mixed with ``--trials``, or spaces without it.
    """
    parsed_spaces = dict(_unique([parse_space(s) for s in spaces], "--space"))
    parsed_grid = dict(_unique([parse_grid(g) for g in grid], "--grid"))
    design = SearchDesign(tuple(templates), parsed_spaces, parsed_grid, trials)
    named = {n for t in templates for n in placeholders(t)}
    if parsed_spaces and parsed_grid:
        raise ConfigError("--space samples and --grid enumerates: use one of them per sweep.")
    if parsed_grid and trials is not None:
        raise ConfigError("--trials counts sampled trials; a --grid tries every point: drop one.")
    if parsed_spaces and trials is None:
        raise ConfigError("--space needs --trials N: how many trials each optimizer gets.")
    given, flag = (parsed_grid, "--grid") if parsed_grid else (parsed_spaces, "--space")
    for name in sorted(named - set(given)):
        raise ConfigError(
            f"An optimizer spec says ${name} but no {flag} gives it: add e.g. "
            f"{flag} '{name}={'1e-4,1e-3' if flag == '--grid' else 'loguniform(1e-5,1e-2)'}'."
        )
    for name in sorted(set(given) - named):
        raise ConfigError(f"{flag} {name}=... is named by no optimizer spec: write ${name} in one.")
    if trials is not None and trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}.")
    if trials is not None and not named:
        raise ConfigError("--trials searches $placeholders, and no optimizer spec has one.")
    return design


def _unique(pairs: list[tuple[str, Any]], flag: str) -> list[tuple[str, Any]]:
    names = [n for n, _ in pairs]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{flag} {name}=... is given twice: give each name once.")
    return pairs
