"""Optimizer specs: a Python-call expression over Optax and Keras, parsed, never evaluated.

A spec is either a bare name (``optax.adamw``, ``keras.AdamW``, ``adamw``), built with the
run's ``learning_rate`` and ``weight_decay``, or a call expression such as
``optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.01))``.

The expression is parsed with ``ast`` and checked node by node against an allow-list before
anything runs: only calls to public ``optax`` callables and ``keras.optimizers`` classes and
schedules, with literal arguments (numbers, strings, booleans, None, lists, tuples, dicts)
and nested allowed calls. Then we build it by walking the checked tree ourselves.
"""

from __future__ import annotations

import ast
import inspect
from typing import Any

import keras
import optax

from kithara_ops.errors import ConfigError

_LITERALS = (int, float, complex, str, bool, type(None))


def _public_callable(namespace: Any, name: str) -> Any | None:
    if name.startswith("_") or not hasattr(namespace, name):
        return None
    value = getattr(namespace, name)
    return value if callable(value) and not inspect.ismodule(value) else None


def resolve_name(dotted: str) -> Any | None:
    """The allowed callable named ``dotted``, or ``None`` if the name is not allowed.

    Allowed: ``optax.X``, ``optax.schedules.X``, ``optax.contrib.X``,
    ``keras.optimizers.X``, ``keras.optimizers.schedules.X``, and ``keras.X`` /
    ``keras.schedules.X`` as shorthands for the Keras optimizer namespaces.
    """
    parts = dotted.split(".")
    if any(p.startswith("_") for p in parts):
        return None
    namespaces = {
        ("optax",): optax,
        ("optax", "schedules"): optax.schedules,
        ("optax", "contrib"): optax.contrib,
        ("keras", "optimizers"): keras.optimizers,
        ("keras",): keras.optimizers,
        ("keras", "optimizers", "schedules"): keras.optimizers.schedules,
        ("keras", "schedules"): keras.optimizers.schedules,
    }
    namespace = namespaces.get(tuple(parts[:-1]))
    if namespace is None:
        return None
    value = _public_callable(namespace, parts[-1])
    if value is not None and parts[0] == "keras":
        allowed = isinstance(value, type) and issubclass(
            value, keras.optimizers.Optimizer | keras.optimizers.schedules.LearningRateSchedule
        )
        return value if allowed else None
    return value


class _Checker:
    """Checks a parsed spec against the allow-list; raises ``ConfigError`` on the first breach."""

    def __init__(self, spec: str):
        self.spec = spec

    def fail(self, node: ast.AST, why: str) -> None:
        segment = ast.get_source_segment(self.spec, node) or type(node).__name__
        column = getattr(node, "col_offset", 0) + 1
        raise ConfigError(
            f"Optimizer spec refused at column {column}, {segment!r}: {why}. Allowed: calls to "
            "optax.* and keras.optimizers.* with literal arguments."
        )

    def dotted(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            base = self.dotted(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    def check(self, node: ast.AST, top: bool = False) -> None:
        if isinstance(node, ast.Call):
            name = self.dotted(node.func)
            if name is None:
                self.fail(node.func, "only named optax/keras callables may be called")
            if resolve_name(name) is None:
                self.fail(node.func, f"{name!r} is not an allowed optax or keras.optimizers name")
            for arg in node.args:
                if isinstance(arg, ast.Starred):
                    self.fail(arg, "*args is not allowed")
                self.check(arg)
            for kw in node.keywords:
                if kw.arg is None:
                    self.fail(kw.value, "**kwargs is not allowed")
                self.check(kw.value)
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, _LITERALS):
                self.fail(node, "only numbers, strings, booleans and None are literals")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            if not (isinstance(node.operand, ast.Constant) and _is_number(node.operand.value)):
                self.fail(node, "a sign may only precede a number")
        elif isinstance(node, ast.List | ast.Tuple):
            for element in node.elts:
                self.check(element)
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if key is None:
                    self.fail(value, "**mapping is not allowed")
                self.check(key)
                self.check(value)
        elif isinstance(node, ast.Attribute | ast.Name) and top:
            name = self.dotted(node)
            if name is None or resolve_name(_expand_bare(name)) is None:
                self.fail(node, f"{name!r} is not an allowed optax or keras.optimizers name")
        else:
            self.fail(node, f"{type(node).__name__} expressions are not allowed")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _expand_bare(name: str) -> str:
    """``adamw`` -> ``optax.adamw``: a name with no module means Optax."""
    return name if "." in name else f"optax.{name}"


def parse_spec(spec: str) -> ast.expr:
    """Parse and check ``spec``; return its expression tree. Runs nothing."""
    if not spec or not spec.strip():
        raise ConfigError("Optimizer spec is empty: pass e.g. 'optax.adamw(1e-3)'.")
    spec = spec.strip()
    try:
        tree = ast.parse(spec, mode="eval")
    except SyntaxError as err:
        raise ConfigError(
            f"Optimizer spec {spec!r} is not a valid expression ({err.msg}, column "
            f"{err.offset}): check brackets and quotes."
        ) from None
    _Checker(spec).check(tree.body, top=True)
    return tree.body


def _build(node: ast.expr, spec: str) -> Any:
    if isinstance(node, ast.Call):
        name = _Checker(spec).dotted(node.func)
        fn = resolve_name(name)
        args = [_build(a, spec) for a in node.args]
        kwargs = {kw.arg: _build(kw.value, spec) for kw in node.keywords}
        try:
            return fn(*args, **kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{name}(...) in the optimizer spec: {err}") from None
    if isinstance(node, ast.List):
        return [_build(e, spec) for e in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_build(e, spec) for e in node.elts)
    if isinstance(node, ast.Dict):
        return {_build(k, spec): _build(v, spec) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)  # a checked constant or signed number


def build_optimizer(
    spec: str, learning_rate: float = 1e-3, weight_decay: float | None = None
) -> Any:
    """Build the optimizer a spec describes.

    Args:
      spec: a bare name or a call expression (see the module docstring).
      learning_rate: used for a bare name only.
      weight_decay: used for a bare name only; refused if the optimizer has no such argument.

    Raises:
      ConfigError: the spec is malformed, not allowed, or its arguments are rejected.
    """
    node = parse_spec(spec)
    if isinstance(node, ast.Call):
        return _build(node, spec.strip())
    name = _expand_bare(_Checker(spec).dotted(node))
    factory = resolve_name(name)
    kwargs: dict[str, Any] = {"learning_rate": learning_rate}
    if weight_decay is not None:
        if "weight_decay" not in inspect.signature(factory).parameters:
            raise ConfigError(
                f"{name} takes no weight_decay, but --weight-decay {weight_decay} was given: "
                "drop it or use an optimizer with decoupled decay (e.g. adamw)."
            )
        kwargs["weight_decay"] = weight_decay
    try:
        return factory(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{name} could not be built: {err}") from None
