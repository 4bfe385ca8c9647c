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

import jax
import jax.numpy as jnp
import keras
import optax

from kithara_ops.errors import ConfigError

_LITERALS = (int, float, complex, str, bool, type(None))
MAX_SPEC_LENGTH = 4000
"""Longer specs are refused before parsing (deep nesting can exhaust the parser)."""


def _public_callable(namespace: Any, name: str) -> Any | None:
    if name.startswith("_") or not hasattr(namespace, name):
        return None
    value = getattr(namespace, name)
    if not callable(value) or inspect.ismodule(value):
        return None
    # Optax re-exports type aliases (optax.Schedule, optax.Params): callable, but types,
    # not optimizer building blocks.
    module = getattr(value, "__module__", "") or ""
    return None if module in ("typing", "collections.abc", "typing_extensions") else value


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
            if isinstance(node.func, ast.Call):
                # optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3): a factory's result.
                self.check(node.func)
            else:
                name = self.dotted(node.func)
                if name is None:
                    self.fail(node.func, "only named optax/keras callables may be called")
                if resolve_name(name) is None:
                    self.fail(
                        node.func, f"{name!r} is not an allowed optax or keras.optimizers name"
                    )
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
        elif isinstance(node, ast.Attribute | ast.Name):
            name = self.dotted(node)
            if name is None:
                self.fail(node, "attributes of a call's result are not allowed")
            if resolve_name(_expand_bare(name) if top else name) is None:
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
    if len(spec) > MAX_SPEC_LENGTH:
        raise ConfigError(
            f"Optimizer spec is {len(spec)} characters long; the limit is {MAX_SPEC_LENGTH}."
        )
    try:
        tree = ast.parse(spec, mode="eval")
    except SyntaxError as err:
        where = f", column {err.offset}" if err.offset else ""
        raise ConfigError(
            f"Optimizer spec {spec!r} is not a valid expression ({err.msg}{where}): "
            "check brackets and quotes."
        ) from None
    except (MemoryError, RecursionError, ValueError):
        raise ConfigError(
            f"Optimizer spec {spec[:60]!r}... is too deeply nested or malformed to parse."
        ) from None
    _Checker(spec).check(tree.body, top=True)
    return tree.body


def _build(node: ast.expr, spec: str) -> Any:
    if isinstance(node, ast.Call):
        if isinstance(node.func, ast.Call):
            fn, name = _build(node.func, spec), ast.get_source_segment(spec, node.func)
        else:
            name = _Checker(spec).dotted(node.func)
            fn = resolve_name(name)
        args = [_build(a, spec) for a in node.args]
        kwargs = {kw.arg: _build(kw.value, spec) for kw in node.keywords}
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # the arguments came from the user: any failure is theirs
            raise ConfigError(f"{name}(...) in the optimizer spec: {_first_line(err)}") from None
    if isinstance(node, ast.Attribute | ast.Name):
        return resolve_name(_Checker(spec).dotted(node))
    if isinstance(node, ast.List):
        return [_build(e, spec) for e in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_build(e, spec) for e in node.elts)
    if isinstance(node, ast.Dict):
        items = [(_build(k, spec), _build(v, spec)) for k, v in zip(node.keys, node.values)]
        try:
            return dict(items)
        except TypeError as err:
            raise ConfigError(f"A dict in the optimizer spec has a bad key: {err}") from None
    return ast.literal_eval(node)  # a checked constant or signed number


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def check_optimizer(optimizer: Any, spec: str) -> Any:
    """Refuse an optimizer that cannot take one step on a tiny problem.

    Optax factories accept anything and fail only at the first update (``adamw('fast')``);
    tracing ``init`` and ``update`` on a two-element parameter catches that at parse time,
    without computing anything (``jax.eval_shape``).
    """
    if isinstance(optimizer, optax.MultiSteps):
        optimizer = optimizer.gradient_transformation()
    if isinstance(optimizer, keras.optimizers.Optimizer):
        return optimizer
    if not isinstance(optimizer, optax.GradientTransformation):
        raise ConfigError(
            f"Optimizer spec {spec!r} builds a {type(optimizer).__name__}, not an optimizer: "
            "use an optax transformation or a keras.optimizers class."
        )
    params = {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}
    try:
        state = jax.eval_shape(optimizer.init, params)
        jax.eval_shape(lambda g, s, p: optimizer.update(g, s, p), params, state, params)
    except Exception as err:
        raise ConfigError(
            f"Optimizer spec {spec!r} cannot update parameters: {_first_line(err)}"
        ) from None
    return optimizer


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
        return check_optimizer(_build(node, spec.strip()), spec.strip())
    name = _expand_bare(_Checker(spec).dotted(node))
    factory = resolve_name(name)
    kwargs: dict[str, Any] = {"learning_rate": learning_rate}
    if weight_decay is not None:
        try:
            accepted = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            accepted = {}
        if "weight_decay" not in accepted:
            raise ConfigError(
                f"{name} takes no weight_decay, but --weight-decay {weight_decay} was given: "
                "drop it or use an optimizer with decoupled decay (e.g. adamw)."
            )
        kwargs["weight_decay"] = weight_decay
    try:
        optimizer = factory(**kwargs)
    except Exception as err:
        raise ConfigError(f"{name} could not be built: {_first_line(err)}") from None
    return check_optimizer(optimizer, name)
