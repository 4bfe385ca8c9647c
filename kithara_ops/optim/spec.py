"""Optimizer specs: a Python-call expression over Optax and Keras, parsed, never evaluated.

A spec is either a bare name (``optax.adamw``, ``keras.AdamW``, ``adamw``), built with the
run's ``learning_rate`` and ``weight_decay``, or a call expression such as
``optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.01))``.

The expression is parsed with ``ast`` and checked node by node against an allow-list before
anything runs: only calls to public ``optax`` callables and ``keras.optimizers`` classes and
schedules, with literal arguments (numbers, strings, booleans, None, lists, tuples, dicts)
and nested allowed calls. The literals are checked too, by kind and range (``spec_checks.py``):
a learning rate is a number > 0 or a schedule, a count a whole number >= 1, and so on. Then we
build it by walking the checked tree ourselves; whatever a library raises while building
becomes one ``ConfigError`` line.
"""

from __future__ import annotations

import ast
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import keras
import optax

from kithara_ops.errors import ConfigError, first_line
from kithara_ops.optim import selectors
from kithara_ops.optim.spec_checks import (
    MAX_NESTING,
    abstract_base,
    check_call,
    number_problem,
    option_problem,
    python_only,
    text_nesting,
    tree_nesting,
)

_LITERALS = (int, float, complex, str, bool, type(None))
MAX_SPEC_LENGTH = 4000
"""Longer specs are refused before parsing (deep nesting can exhaust the parser)."""
_ALLOWED = "Allowed: calls to optax.* and keras.optimizers.* with literal arguments."


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

    def fail(self, node: ast.AST, why: str, fix: str = _ALLOWED) -> None:
        segment = ast.get_source_segment(self.spec, node) or type(node).__name__
        line = getattr(node, "lineno", 1)
        where = f"line {line}, column" if line > 1 else "column"
        column = getattr(node, "col_offset", 0) + 1
        raise ConfigError(
            f"Optimizer spec refused at {where} {column}, {_quote(segment)}: {why}. {fix}"
        )

    def dotted(self, node: ast.AST) -> str | None:
        # A loop, not recursion: a spec may hold a chain of a thousand attributes.
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        return ".".join([node.id, *reversed(parts)])

    def refuse_abstract(self, node: ast.AST, name: str, value: object) -> None:
        """Refuse an abstract base, or a class a spec cannot build (``python_only``)."""
        refused = python_only(value)
        if refused is not None:
            self.fail(node, *refused)
        suggestion = abstract_base(value)
        if suggestion is not None:
            self.fail(
                node,
                f"{name} is an abstract base class",
                f"Name a concrete one such as {suggestion}.",
            )

    def check_arguments(self, node: ast.Call, name: str, function: object) -> None:
        seen = set()
        for kw in node.keywords:
            if kw.arg in seen:
                self.fail(kw, f"keyword {kw.arg!r} is given twice in {name}(...)", "Keep one.")
            seen.add(kw.arg)
        problem = check_call(function, name, node)
        if problem is not None:
            self.fail(*problem)

    def check(self, node: ast.AST, top: bool = False) -> None:
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Call):
                # optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3): a factory's result.
                self.check(node.func)
                segment = _one_line(ast.get_source_segment(self.spec, node.func))
                name, function = _cut(segment), None
                inner = node.func
                if _short(self.dotted(inner.func)).startswith("inject_") and inner.args:
                    # inject_hyperparams passes its keywords on to the factory it wraps.
                    function = resolve_name(self.dotted(inner.args[0]) or "")
            else:
                name = self.dotted(node.func)
                if name is None:
                    self.fail(node.func, "only named optax/keras callables may be called")
                function = resolve_name(name)
                if function is None:
                    self.fail(
                        node.func,
                        f"{_quote(name)} is not an allowed optax or keras.optimizers name",
                    )
                self.refuse_abstract(node.func, name, function)
            for arg in node.args:
                if isinstance(arg, ast.Starred):
                    self.fail(arg, "*args is not allowed")
                self.check(arg)
            for kw in node.keywords:
                if kw.arg is None:
                    self.fail(kw.value, "**kwargs is not allowed")
                self.check(kw.value)
            # After the arguments themselves, so that a bad literal gets its own message.
            self.check_arguments(node, name, function)
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, _LITERALS):
                self.fail(node, "only numbers, strings, booleans and None are literals")
            problem = number_problem(node.value)
            if problem:
                self.fail(node, *problem)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            operand = node.operand
            if isinstance(operand, ast.Constant) and isinstance(operand.value, complex):
                self.fail(node, *number_problem(operand.value))
            if not (isinstance(operand, ast.Constant) and _is_number(operand.value)):
                self.fail(node, "a sign may only precede a number")
            problem = number_problem(operand.value)
            if problem:
                self.fail(node, *problem)
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
            value = resolve_name(_expand_bare(name) if top else name)
            if value is None:
                self.fail(node, f"{_quote(name)} is not an allowed optax or keras.optimizers name")
            self.refuse_abstract(node, name, value)
        else:
            self.fail(node, f"{type(node).__name__} expressions are not allowed")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _short(name: str | None) -> str:
    """``optax.schedules.inject_hyperparams`` -> ``inject_hyperparams``."""
    return (name or "").rsplit(".", 1)[-1]


def _one_line(text: str | None) -> str:
    """A spec fragment on one line: messages are one line, specs may span several."""
    return " ".join((text or "").split())


def _cut(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters: a message names a part of a spec, not all of it."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quote(text: str, limit: int = 80) -> str:
    """``text`` quoted for a message, cut to ``limit`` characters."""
    return repr(text) if len(text) <= limit else repr(text[: limit - 3]) + "..."


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
            f"Optimizer spec is {len(spec)} characters long; the limit is {MAX_SPEC_LENGTH}: "
            "name the optimizer and its arguments only."
        )
    # Counted before parsing: the parser recurses once per level.
    if text_nesting(spec) > MAX_NESTING:
        raise _too_deep(spec)
    try:
        tree = ast.parse(spec, mode="eval")
    except SyntaxError as err:
        line = f", line {err.lineno}" if err.lineno and err.lineno > 1 else ""
        where = f"{line}, column {err.offset}" if err.offset else line
        raise ConfigError(
            f"Optimizer spec {_quote(spec)} is not a valid expression ({err.msg}{where}): "
            "check brackets and quotes."
        ) from None
    except (MemoryError, RecursionError, ValueError):
        raise ConfigError(
            f"Optimizer spec {_quote(spec, 60)} is too deeply nested or malformed to parse: "
            "write it as a plain call such as 'optax.adamw(1e-3)'."
        ) from None
    # Calls on calls (f()()()) nest without brackets; the checker below recurses per level.
    if tree_nesting(tree.body) > MAX_NESTING:
        raise _too_deep(spec)
    _Checker(spec).check(tree.body, top=True)
    return tree.body


def _too_deep(spec: str) -> ConfigError:
    return ConfigError(
        f"Optimizer spec {_quote(spec, 60)} has too many nested calls and brackets (the limit "
        f"is {MAX_NESTING}): flatten it, e.g. one optax.chain(...) with all the parts in it."
    )


def _build(node: ast.expr, spec: str) -> Any:
    if isinstance(node, ast.Call):
        if isinstance(node.func, ast.Call):
            fn = _build(node.func, spec)
            name = _cut(_one_line(ast.get_source_segment(spec, node.func)))
        else:
            name = _Checker(spec).dotted(node.func)
            fn = resolve_name(name)
        args = [_build(a, spec) for a in node.args]
        kwargs = {kw.arg: _build(kw.value, spec) for kw in node.keywords}
        args, kwargs = _with_selectors(fn, name, args, kwargs)
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


def _with_selectors(fn: Any, name: str, args: list, kwargs: dict) -> tuple[list, dict]:
    """Masks and labels written as literals (a regex string, a dict of regex -> label) as
    the path selectors Optax calls with the parameters (see ``selectors.py``)."""
    if not (getattr(fn, "__module__", "") or "").startswith("optax"):
        return args, kwargs
    try:
        bound = inspect.signature(fn).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return args, kwargs  # the call itself reports the mismatch
    takes = selectors.MASK_ARGUMENTS | selectors.LABEL_ARGUMENTS
    if not takes & set(bound.arguments):
        return args, kwargs
    for argument in takes & set(bound.arguments):
        where = f"{argument} of {name}"
        bound.arguments[argument] = selectors.literal_selector(
            argument, bound.arguments[argument], where
        )
        transforms = bound.arguments.get("transforms")
        if argument in selectors.LABEL_ARGUMENTS and isinstance(transforms, dict):
            # Caught here, not at the first step, where Optax fails with a traceback.
            unknown = selectors.unknown_label(bound.arguments[argument], list(transforms), where)
            if unknown is not None:
                raise unknown
    return list(bound.args), dict(bound.kwargs)


def _first_line(err: Exception) -> str:
    """The error's type and first line: a library's message names what it refused."""
    line = first_line(err, limit=None)
    return f"{type(err).__name__}: {line}" if str(err).strip() else line


def _takes_value(optimizer: Any) -> bool:
    """Whether the optimizer's update accepts the loss as ``value`` (as the adapter passes it)."""
    from kithara_ops.optim.optax_adapter import takes_value

    extra_args = isinstance(optimizer, optax.GradientTransformationExtraArgs)
    return extra_args and takes_value(optimizer.update)


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
            f"Optimizer spec {_quote(spec)} builds a {type(optimizer).__name__}, not an optimizer: "
            "use an optax transformation or a keras.optimizers class."
        )
    from kithara_ops.optim.introspect import walk
    from kithara_ops.optim.optax_adapter import refuse_unsupported

    try:
        refuse_unsupported(walk(optimizer))  # needs a loss function, per-example gradients...
    except ConfigError as err:
        raise ConfigError(f"Optimizer spec {_quote(spec)}: {err}") from None
    params = {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}
    # Transformations that take the loss (polyak_sgd, contrib.momo, reduce_on_plateau) get
    # one, as the train step gives it.
    extra = {"value": jnp.float32(1.0)} if _takes_value(optimizer) else {}
    try:
        state = jax.eval_shape(optimizer.init, params)
        jax.eval_shape(lambda g, s, p: optimizer.update(g, s, p, **extra), params, state, params)
    except selectors.UnmatchedParameter:
        pass  # "w" stands in for the model's parameters: their paths are checked at start
    except Exception as err:
        raise ConfigError(
            f"Optimizer spec {_quote(spec)} cannot update parameters: {_first_line(err)}"
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
    for param, value in (("learning_rate", learning_rate), ("weight_decay", weight_decay)):
        problem = option_problem(factory, name, param, value) if value is not None else None
        if problem:
            raise ConfigError(problem)
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
