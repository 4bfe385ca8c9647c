"""The rules an optimizer spec's shape and literal arguments must meet before anything is built.

``spec.py`` parses a spec and walks its tree; this module holds what the walk applies:

- how deeply a spec may nest calls and brackets (counted on the text before parsing, and on
  the tree after it);
- which numbers may appear at all (real, finite, within float32's range);
- which arguments take a number, and in which range (learning rates > 0, betas in [0, 1),
  counts whole and >= 1, ...), keyed by parameter name and matched to positional arguments
  through the callable's signature;
- which allowed names are abstract bases or interfaces rather than optimizers.

Nothing here calls a spec's callables: signatures are read, never invoked.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import io
import math
import tokenize
from collections.abc import Callable
from typing import Any, NamedTuple

import keras
import optax

MAX_NESTING = 32
"""Calls and brackets a spec may nest. ``optax.chain`` takes any number of parts, so real specs
stay far below; thousands of levels would exhaust the parser."""

FLOAT32_MAX = 3.4028234663852886e38
"""Hyperparameters live on device as float32 (JAX's default): a larger number becomes inf."""

_OPEN, _CLOSE = {"(", "[", "{"}, {")", "]", "}"}
_NESTING_NODES = (ast.Call, ast.List, ast.Tuple, ast.Dict, ast.Set)


class Problem(NamedTuple):
    """One refused part of a spec: the node to point at, what is wrong, and how to fix it."""

    node: ast.AST
    why: str
    fix: str


def text_nesting(spec: str) -> int:
    """How deeply ``spec``'s brackets nest, counted on tokens so strings and comments don't count.

    Stops counting just past ``MAX_NESTING``. Text that does not tokenize (an unclosed
    bracket, a stray character) is counted as far as it goes; the parser reports the rest.
    """
    depth = deepest = 0
    try:
        for token in tokenize.generate_tokens(io.StringIO(spec).readline):
            if token.type != tokenize.OP:
                continue
            if token.string in _OPEN:
                depth += 1
                deepest = max(deepest, depth)
                if deepest > MAX_NESTING:
                    break
            elif token.string in _CLOSE:
                depth -= 1
    except (tokenize.TokenError, SyntaxError):
        pass
    return deepest


def tree_nesting(tree: ast.AST) -> int:
    """How deeply calls and brackets nest in a parsed spec, walked without recursion.

    Catches what the text count cannot: calls on calls (``f()()()...``) nest one call per
    pair of brackets at a bracket depth of one.
    """
    deepest = 0
    stack = [(tree, 0)]
    while stack and deepest <= MAX_NESTING:
        node, depth = stack.pop()
        if isinstance(node, _NESTING_NODES):
            depth += 1
            deepest = max(deepest, depth)
        stack.extend((child, depth) for child in ast.iter_child_nodes(node))
    return deepest


def number_problem(value: Any) -> tuple[str, str] | None:
    """Why a numeric literal may not appear anywhere in a spec, with the fix; None if it may."""
    if isinstance(value, complex):
        return "complex numbers are not allowed", "Write a real number such as 0.1."
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return "the number overflows to infinity", "Write a finite number such as 1e-3."
    if abs(value) > FLOAT32_MAX:
        return (
            "the number is beyond float32's range (3.4e38) and becomes infinity on device",
            "Write a smaller number.",
        )
    return None


# --------------------------------------------------------------------------- abstract bases


def abstract_base(value: Any) -> str | None:
    """A concrete spec to suggest if ``value`` is an abstract base or an interface, else None.

    These names are public and callable, so the allow-list lets them through, but what they
    build cannot train: a base Keras optimizer has no update rule, a base schedule no values,
    and ``optax.GradientTransformation`` needs Python functions a spec cannot write.
    """
    suggestions = [
        (keras.optimizers.Optimizer, "keras.optimizers.AdamW(1e-3)"),
        (
            keras.optimizers.schedules.LearningRateSchedule,
            "keras.optimizers.schedules.CosineDecay(1e-3, 1000)",
        ),
        (optax.GradientTransformation, "optax.adamw(1e-3)"),
        (optax.GradientTransformationExtraArgs, "optax.adamw(1e-3)"),
    ]
    for base, suggestion in suggestions:
        if value is base:
            return suggestion
    # typing.Protocol classes (optax.TransformInitFn, optax.schedules.StatefulSchedule, ...)
    if isinstance(value, type) and getattr(value, "_is_protocol", False):
        return "optax.adamw(1e-3)"
    return None


def python_only(value: Any) -> tuple[str, str] | None:
    """Why an allowed name cannot be built from a spec, with the fix; None if it can.

    ``keras.optimizers.MultiOptimizer`` routes variables through an ``OptimizerMap`` (or a
    function), which a spec cannot write: given a dict it builds, then fails at the first
    step.
    """
    if value is getattr(keras.optimizers, "MultiOptimizer", None):
        return (
            "a MultiOptimizer routes variables with an OptimizerMap, which a spec cannot write",
            "Build it in Python and pass it to kithara_ops.Trainer(model, optimizer, data), or "
            "write optax.multi_transform({'adam': optax.adam(1e-3), 'sgd': optax.sgd(1e-2)}, "
            "{'emb': 'sgd', '.*': 'adam'}) in the spec.",
        )
    return None


# --------------------------------------------------------------------------- argument rules


class Rule(NamedTuple):
    """What a numeric argument must be: a test, its wording, and a valid example."""

    accepts: Callable[[float], bool]
    need: str
    example: str
    whole: bool = False  # counts: 1e4 is a count, 2.5 is not


_LEARNING_RATE = Rule(lambda v: v > 0, "a number > 0 or a schedule call", "1e-3")
_RAMP_START = Rule(lambda v: v >= 0, "a number >= 0", "0.0")
_POSITIVE = Rule(lambda v: v > 0, "a number > 0", "1.0")
_NON_NEGATIVE = Rule(lambda v: v >= 0, "a number >= 0", "0.0")
_FRACTION = Rule(lambda v: 0 <= v < 1, "a number in [0, 1)", "0.9")
_COUNT = Rule(lambda v: v >= 1, "a whole number >= 1", "10", whole=True)
_OFFSET = Rule(lambda v: v >= 0, "a whole number >= 0", "0", whole=True)
_NUMBER = Rule(lambda v: True, "a number", "1.0")

RULES: dict[str, Rule] = {
    # learning rates and what schedules start at or rise to
    **dict.fromkeys(
        ["learning_rate", "init_value", "initial_learning_rate", "peak_value", "warmup_target"],
        _LEARNING_RATE,
    ),
    # where zero is legal: no decay, no epsilon, a schedule that ends at zero
    **dict.fromkeys(
        [
            "weight_decay",
            "eps",
            "eps_root",
            "epsilon",
            "end_value",
            "end_learning_rate",
            "initial_accumulator_value",
        ],
        _NON_NEGATIVE,
    ),
    # clipping thresholds: zero would drop every update
    **dict.fromkeys(
        ["max_norm", "max_delta", "clipnorm", "clipvalue", "global_clipnorm"], _POSITIVE
    ),
    # decay rates of moving averages: 1 never updates the average (Adam divides by zero)
    **dict.fromkeys(
        ["b1", "b2", "b3", "beta_1", "beta_2", "rho", "momentum", "decay", "ema_momentum"],
        _FRACTION,
    ),
    **dict.fromkeys(
        [
            "every_k_schedule",
            "decay_steps",
            "first_decay_steps",
            "transition_steps",
            "k",
            "sync_period",
            "gradient_accumulation_steps",
        ],
        _COUNT,
    ),
    **dict.fromkeys(["warmup_steps", "transition_begin"], _OFFSET),
    **dict.fromkeys(
        ["decay_rate", "power", "exponent", "alpha", "t_mul", "m_mul", "step_size"], _NUMBER
    ),
}
"""Numeric arguments by parameter name; the names mean the same in every optax and Keras
callable that has them."""

_RAMP_STARTS = {"init_value", "initial_learning_rate"}


def _ramps(function: str, bound: dict[str, ast.expr]) -> bool:
    """Whether a schedule rises from its start value, so that the start may be 0."""
    short = function.rsplit(".", 1)[-1]
    target = bound.get("warmup_target")
    has_target = target is not None and not (
        isinstance(target, ast.Constant) and target.value is None
    )
    return (
        short.startswith("warmup_")
        or short in ("linear_schedule", "polynomial_schedule", "PolynomialDecay")
        or has_target
    )


_NOT_LITERAL = object()


def _literal(node: ast.expr) -> Any:
    """The value of a constant or signed number, else ``_NOT_LITERAL``."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.operand, ast.Constant):
        value = node.operand.value
        return -value if isinstance(node.op, ast.USub) else value
    return _NOT_LITERAL


def value_problem(
    param: str, value: Any, function: str, rule: Rule, none_ok: bool
) -> tuple[str, str] | None:
    """Why ``value`` cannot be ``function``'s argument ``param``, with the fix; None if it can."""
    fix = f"Use e.g. {param}={rule.example}."
    if value is None:
        return None if none_ok else (f"{param} of {function} takes a number, not None", fix)
    if isinstance(value, bool | str | bytes):
        kind = "a boolean" if isinstance(value, bool) else "a string"
        return f"{param} of {function} takes a number, not {kind}", fix
    if not isinstance(value, int | float):
        return None  # complex and the like: number_problem has its own message
    whole = not rule.whole or float(value).is_integer()
    if not (rule.accepts(value) and whole):
        return f"{param} of {function} must be {rule.need}", fix
    return None


def _example(rule: Rule, parameter: inspect.Parameter | None) -> Rule:
    """``rule`` with the callable's own default as its example, when that default is valid."""
    default = parameter.default if parameter is not None else None
    is_number = isinstance(default, int | float) and not isinstance(default, bool)
    if is_number and rule.accepts(default) and (not rule.whole or float(default).is_integer()):
        return rule._replace(example=repr(default))
    return rule


def _argument_problem(
    param: str,
    node: ast.expr,
    function: str,
    parameter: inspect.Parameter | None,
    bound: dict[str, ast.expr],
) -> Problem | None:
    rule = RULES.get(param)
    if rule is None:
        return None
    if param in _RAMP_STARTS and _ramps(function, bound):
        rule = _RAMP_START
    rule = _example(rule, parameter)
    if isinstance(node, ast.List | ast.Tuple | ast.Dict | ast.Set):
        kind = type(node).__name__.lower()
        return Problem(
            node,
            f"{param} of {function} takes a number, not a {kind}",
            f"Use e.g. {param}={rule.example}.",
        )
    value = _literal(node)
    if value is _NOT_LITERAL:
        return None  # a schedule or another call: its own arguments are checked in turn
    # With no declared parameter (no signature, or one taken by **kwargs), the library has
    # the last word on None.
    none_ok = parameter is None or parameter.default is None
    found = value_problem(param, value, function, rule, none_ok)
    return Problem(node, *found) if found else None


def option_problem(function: Any, name: str, param: str, value: Any) -> str | None:
    """Why a run option (``--learning-rate``) cannot be ``param`` of ``function``; None if it can.

    For a bare name in a spec, which is built with the run's options rather than literals.
    """
    rule = RULES.get(param)
    if rule is None:
        return None
    signature = _signature(function)
    parameter = signature.parameters.get(param) if signature else None
    found = number_problem(value) or value_problem(
        param,
        value,
        name,
        _example(rule, parameter),
        parameter is None or parameter.default is None,
    )
    return f"{found[0]} (got {value!r}). {found[1]}" if found else None


def _signature(function: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(function)
    except (TypeError, ValueError):
        return None


def check_call(function: Any, name: str, call: ast.Call) -> Problem | None:
    """The first problem with ``call``'s arguments to ``function`` (named ``name``), or None.

    Arguments are matched to parameters through the signature without calling anything, so
    a positional learning rate is checked like ``learning_rate=``. ``function`` is None when
    the callee is only known once built; keywords are then checked by name alone.
    """
    signature = _signature(function) if function is not None else None
    if signature is None:
        bound = {kw.arg: kw.value for kw in call.keywords if kw.arg is not None}
        for param, node in bound.items():
            problem = _argument_problem(param, node, name, None, bound)
            if problem:
                return problem
        return None
    params = signature.parameters
    takes = ", ".join(
        p
        for p in params
        if params[p].kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    )
    open_keywords = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for kw in call.keywords:
        known = kw.arg in params and params[kw.arg].kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        )
        if not known and not open_keywords:
            close = difflib.get_close_matches(kw.arg, list(params), n=1)
            hint = f"Did you mean {close[0]!r}?" if close else f"It takes: {takes}."
            return Problem(kw, f"{name}(...) has no argument {kw.arg!r}", hint)
    try:
        arguments = signature.bind(*call.args, **{kw.arg: kw.value for kw in call.keywords})
    except TypeError as err:
        return Problem(call, f"{name}(...): {err}", f"It takes: {takes}.")
    bound: dict[str, ast.expr] = {}
    for param, value in arguments.arguments.items():
        kind = params[param].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            bound.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            bound[param] = value
    for param, node in bound.items():
        problem = _argument_problem(param, node, name, params.get(param), bound)
        if problem:
            return problem
    return None
