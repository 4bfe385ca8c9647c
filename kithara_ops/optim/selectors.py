"""Selecting parameters by path, for masks and labels written as literals in a spec.

The Trainer's parameters are a dict keyed by Keras variable path (``tiny/out/kernel``), so
Optax's per-parameter arguments can be functions of those paths:

- a **mask** written as a string is a regular expression; a parameter is selected when the
  expression matches somewhere in its path (``re.search``):
  ``optax.adamw(1e-3, mask="kernel$")`` decays the kernels only;
- **labels** written as a dict map path expressions to labels, tried in order; the first
  that matches a path gives its label, and a path that none matches is an error naming it:
  ``optax.multi_transform({"a": optax.adam(1e-3), "s": optax.sgd(1e-2)}, {"emb": "s", ".*": "a"})``.

Both become callables ``params -> {path: bool | label}``, which Optax accepts wherever it
takes a mask or labels. Nothing in a spec is evaluated: the expressions are compiled with
``re`` and only ever matched.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from kithara_ops.errors import ConfigError

MASK_ARGUMENTS = {"mask"}
"""Optax arguments that take a mask (``masked``, ``freeze``, ``adamw``, ``add_decayed_weights``...)."""
LABEL_ARGUMENTS = {"param_labels"}
"""Optax arguments that take labels (``multi_transform``, ``partition``)."""


class UnmatchedParameter(ConfigError):
    """A parameter path that no label pattern matches."""


def _compiled(pattern: str, where: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ConfigError(
            f"{where}: {pattern!r} is not a valid regular expression ({err}): "
            r"write e.g. 'kernel$' or '^model/block_\d+/'."
        ) from None


class PathMask:
    """``params -> {path: re.search(pattern, path) is not None}``."""

    def __init__(self, pattern: str, where: str = "mask"):
        self.pattern = pattern
        self._regex = _compiled(pattern, where)
        self.__qualname__ = f"paths({pattern!r})"  # how descriptions name it

    def __call__(self, params: Mapping[str, Any]) -> dict[str, bool]:
        return {path: self._regex.search(path) is not None for path in _paths(params)}


class PathLabels:
    """``params -> {path: the label of the first pattern that matches path}``."""

    def __init__(self, patterns: Mapping[str, str], where: str = "param_labels"):
        if not patterns:
            raise ConfigError(f"{where} is empty: map path patterns to labels, e.g. {{'.*': 'a'}}.")
        for label in patterns.values():
            if not isinstance(label, str):
                raise ConfigError(f"{where}: labels are strings, got {label!r}.")
        self.patterns = dict(patterns)
        self._rules = [(_compiled(p, where), label) for p, label in patterns.items()]
        self.__qualname__ = f"labels({self.patterns!r})"

    def __call__(self, params: Mapping[str, Any]) -> dict[str, str]:
        labels = {}
        for path in _paths(params):
            label = next((lab for regex, lab in self._rules if regex.search(path)), None)
            if label is None:
                raise UnmatchedParameter(
                    f"parameter {path!r} matches none of the label patterns "
                    f"{list(self.patterns)}: add a pattern for it, or '.*' last as a default."
                )
            labels[path] = label
        return labels


def unknown_label(labels: Any, transforms: list[str], where: str) -> ConfigError | None:
    """The error for a label in ``labels`` that names none of ``transforms``, or None.

    ``labels`` is a ``PathLabels`` or a tree of label strings (what ``multi_transform`` and
    ``partition`` take); a labelling function can only be checked once it is called.
    """
    if isinstance(labels, PathLabels):
        given = [(label, f" (for paths matching {pattern!r})") for pattern, label in labels.patterns.items()]  # fmt: skip
    else:
        given = [(label, "") for label in _leaves(labels)]
    for label, which in given:
        if isinstance(label, str) and label not in transforms:
            there = ", ".join(repr(t) for t in transforms) or "none"
            return ConfigError(
                f"{where}: label {label!r}{which} names no transform; the transforms are {there}."
            )
    return None


def _leaves(tree: Any) -> list:
    if isinstance(tree, Mapping):
        return [leaf for value in tree.values() for leaf in _leaves(value)]
    if isinstance(tree, list | tuple):
        return [leaf for value in tree for leaf in _leaves(value)]
    return [tree]


def _paths(params: Any) -> list[str]:
    if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
        raise ConfigError(
            "a path mask or label pattern needs the parameters as a dict keyed by path "
            "(as the Trainer passes them); build the mask yourself for other trees."
        )
    return list(params)


def literal_selector(argument: str, value: Any, where: str) -> Any:
    """``value`` as a path selector when ``argument`` takes one and ``value`` is its literal
    form (a string mask, a dict of string labels); otherwise ``value`` unchanged."""
    if argument in MASK_ARGUMENTS and isinstance(value, str):
        return PathMask(value, where)
    literal_labels = isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if argument in LABEL_ARGUMENTS and literal_labels:
        return PathLabels(value, where)
    return value
