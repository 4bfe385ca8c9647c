"""Read the structure of an Optax transformation from the closures its factories leave.

Optax builds optimizers as closures: ``optax.adamw(...)`` returns a chain whose ``update``
function closes over the inner transformations, and each of those closes over its
hyperparameters. Walking those closures recovers the real tree (no wrapping, no change to
state or numerics). Anything we cannot read is reported as it is, never guessed.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax


@dataclasses.dataclass
class TxNode:
    """One transformation in an Optax tree.

    Attributes:
      name: the factory that made it (``chain``, ``scale_by_adam``, ``scale``, ...), or
        ``unknown`` when the update function is not an Optax factory's closure.
      hyperparams: plain values (numbers, strings, bools, None) it closes over.
      functions: callables it closes over that are not transformations (schedules, masks).
      children: inner transformations, in order.
      roles: for each child, the name its parent holds it by (``optimizer`` and
        ``adv_optimizer`` in ``sam``, a ``multi_transform`` label, a ``named_chain`` name),
        or ``""`` for a chain's positional parts; empty when not read from closures.
    """

    name: str
    hyperparams: dict[str, Any]
    functions: dict[str, Callable]
    children: list[TxNode]
    roles: list[str] = dataclasses.field(default_factory=list)

    def child(self, role: str) -> TxNode | None:
        """The child held by the name ``role``, or ``None``."""
        if len(self.roles) != len(self.children):
            return None
        return dict(zip(self.roles, self.children)).get(role)


def closure_values(fn: Callable) -> dict[str, Any]:
    """A function's free variables and their values (empty for non-closures)."""
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    if code is None:
        return {}
    values = {}
    for name, cell in zip(code.co_freevars, cells):
        try:
            values[name] = cell.cell_contents
        except ValueError:  # an empty cell: the closure is still being defined
            continue
    return values


def factory_name(fn: Callable) -> str:
    """``'scale_by_adam'`` for ``scale_by_adam.<locals>.update_fn``; ``'unknown'`` otherwise."""
    qualname = getattr(fn, "__qualname__", "")
    module = getattr(fn, "__module__", "") or ""
    if "<locals>" not in qualname or not module.startswith("optax"):
        return "unknown"
    return qualname.split(".<locals>")[0].split(".")[-1]


def _is_update_fn(value: Any) -> bool:
    """True for the ``update`` function of an Optax factory (what chains close over)."""
    qualname = getattr(value, "__qualname__", "")
    return (
        callable(value)
        and factory_name(value) != "unknown"
        and (qualname.endswith("update_fn") or qualname.endswith("<locals>.update"))
    )


def walk(tx: optax.GradientTransformation) -> TxNode:
    """The tree of transformations inside ``tx``, read from its closures."""
    return _walk(tx.update, tx.init)


def _walk(update: Callable, init: Callable | None = None) -> TxNode:
    multi_steps = getattr(update, "__self__", None)
    if isinstance(multi_steps, optax.MultiSteps):
        every_k = multi_steps._every_k_schedule  # no public accessor; read-only use
        # MultiSteps wraps an int k as ``lambda step: k``; the int is that lambda's closure.
        constant = closure_values(every_k).get("every_k_schedule", every_k)
        hyperparams, functions = {}, {}
        if isinstance(constant, int) and not isinstance(constant, bool):
            hyperparams["every_k_schedule"] = constant
        elif callable(every_k):
            functions["every_k_schedule"] = every_k
        inner = multi_steps.inner_opt
        return TxNode("MultiSteps", hyperparams, functions, [_walk(inner.update, inner.init)])
    # with_extra_args_support only adapts a signature: look through it.
    while factory_name(update) == "with_extra_args_support":
        inner = closure_values(update)["tx"]
        update, init = inner.update, inner.init
    node = TxNode(factory_name(update), {}, {}, [])
    values = {**(closure_values(init) if init is not None else {}), **closure_values(update)}
    # A chain keeps its parts' init and update functions apart: read each pair together,
    # since some hyperparameters live only in an init's closure (dadapt_adamw's estim_lr0).
    inits = values.get("init_fns")

    def add(role: str, child: TxNode) -> None:
        node.children.append(child)
        node.roles.append(role)

    for key, value in values.items():
        if key == "init_fns" and isinstance(values.get("update_fns"), tuple | list):
            continue
        if key == "update_fns" and isinstance(inits, tuple | list) and len(inits) == len(value):
            for i, u in zip(inits, value):
                add("", _walk(u, i))
            continue
        if isinstance(value, optax.GradientTransformation):
            add(key, _walk(value.update, value.init))
        elif isinstance(value, tuple | list) and value and all(map(_is_named_part, value)):
            for name, tx in value:  # named_chain
                add(name, _walk(tx.update, tx.init))
        elif isinstance(value, tuple | list) and value and all(map(_is_update_fn, value)):
            for fn in value:
                add("", _walk(fn))
        elif (
            isinstance(value, tuple | list | dict)
            and value
            and all(isinstance(v, optax.GradientTransformation) for v in _values(value))
        ):
            names = [str(k) for k in value] if isinstance(value, dict) else [""] * len(value)
            for name, v in zip(names, _values(value)):
                add(name, _walk(v.update, v.init))
        elif _is_key(value):
            node.hyperparams[key] = key_text(value)
        elif _is_plain(value):
            node.hyperparams[key] = value
        elif isinstance(value, tuple | list) and all(callable(v) for v in value):
            continue  # a chain's init functions: the update functions carry the structure
        elif callable(value):
            node.functions[key] = value
        elif isinstance(value, dict | tuple | list):
            node.hyperparams[key] = value
    _read_helpers(node)
    return node


def _read_helpers(node: TxNode) -> None:
    """Add the values closed over by helper functions the factory defined for its update
    (NovoGrad's and RAdam's ``b1``/``eps`` live there, not in ``update`` itself)."""
    seen, todo = set(), [f for f in node.functions.values() if factory_name(f) == node.name]
    while todo:
        fn = todo.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        for key, value in closure_values(fn).items():
            if _is_plain(value) and not _is_key(value):
                node.hyperparams.setdefault(key, value)
            elif callable(value) and factory_name(value) == node.name:
                todo.append(value)


def _is_named_part(value: Any) -> bool:
    """True for a ``(name, transformation)`` pair, as ``named_chain`` keeps its parts."""
    return (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], optax.GradientTransformation)
    )


def _is_key(value: Any) -> bool:
    """True for a typed PRNG key array (``jax.random.key(0)``)."""
    return isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key)


def key_text(key: jax.Array) -> str:
    """A typed key as text, ``key(threefry2x32, [0, 0])``: its kind and its bits."""
    bits = np.asarray(jax.random.key_data(key)).tolist()
    return f"key({jax.random.key_impl(key)}, {bits})"


def _is_plain(value: Any) -> bool:
    """True for a hyperparameter value: None, a bool, str, number, dtype or 0-d array."""
    return (
        value is None
        or isinstance(value, bool | str | numbers.Number | np.dtype)
        or _is_scalar(value)
    )


def _is_scalar(value: Any) -> bool:
    """True for a 0-d NumPy or JAX array (a hyperparameter passed as an array)."""
    return isinstance(value, np.ndarray | jax.Array) and value.ndim == 0


def _values(container: Any) -> list:
    return list(container.values()) if isinstance(container, dict) else list(container)


def find_learning_rate(node: TxNode) -> float | Callable | None:
    """The learning rate (a number or a schedule of the step count) that ``node`` applies.

    Optax's ``scale_by_learning_rate(lr)`` becomes ``scale(-lr)`` for a constant and
    ``scale_by_schedule(lambda count: -lr(count))`` for a schedule. With ``flip_sign=False``
    (Adafactor) it is ``scale(lr)`` and a separate ``scale(-1)`` flips the sign later; the
    ``-1`` is a sign, not a learning rate, unless no other step precedes it: then it is
    ``scale(-lr)`` with a learning rate of exactly 1.

    Under ``optax.multi_transform`` (``partition``), it is the rate of the first transform
    (in the order of its ``transforms``) that has one: the one ``describe_optimizer`` names.

    Learning-rate-free methods keep their configured base inside their core (Prodigy's and
    D-Adaptation's ``learning_rate`` multiplies the step size they estimate, Polyak's
    ``max_learning_rate`` caps it, COCOB's ``scale(learning_rate)`` comes before its core):
    when no negative step is found, that base is the learning rate. Returns ``None`` when
    nothing is recognised.
    """
    if any(part.name == "scale_by_polyak" for part in _all_nodes(node)):
        # polyak_sgd's SGD step before the core is its ``scaling``, not its learning rate.
        return _configured_base(node)
    found, sign_flipped = _find_learning_rate(node, sign_flipped=False)
    if found is None:
        found = _configured_base(node)
    # A scale(-1) with no step before it: sgd(1.0) and the like.
    return 1.0 if found is None and sign_flipped else found


def _configured_base(node: TxNode) -> float | Callable | None:
    """A ``learning_rate`` (or ``max_learning_rate``) closed over anywhere under ``node``,
    else the step of a positive ``scale`` placed before a core."""
    for key in ("learning_rate", "max_learning_rate"):
        for part in _all_nodes(node):
            value = part.hyperparams.get(key, part.functions.get(key))
            if _is_scalar(value):
                value = value.item()
            if callable(value) or (isinstance(value, numbers.Number) and not isinstance(value, bool)):  # fmt: skip
                return value
    parts = _all_nodes(node)
    for part in parts:  # optimistic_adam's step size is the optimistic gradient's alpha
        alpha = part.hyperparams.get("alpha")
        if part.name == "scale_by_optimistic_gradient" and isinstance(alpha, numbers.Number):
            return float(alpha)
    for i, part in enumerate(parts):
        step = part.hyperparams.get("step_size")
        positive = part.name == "scale" and isinstance(step, numbers.Number) and step > 0
        # Before a core (COCOB), the core sets the sign; after every core it is an ascent.
        if positive and any(p.name.startswith("scale_by_") for p in parts[i + 1 :]):
            return float(step)
    return None


def _all_nodes(node: TxNode) -> list[TxNode]:
    return [node, *(n for child in node.children for n in _all_nodes(child))]


def _find_learning_rate(node: TxNode, sign_flipped: bool) -> tuple[Any, bool]:
    if node.name == "scale_by_schedule":
        step_size_fn = node.functions.get("step_size_fn")
        if step_size_fn is not None and factory_name(step_size_fn) == "scale_by_learning_rate":
            return closure_values(step_size_fn)["learning_rate"], sign_flipped
    if node.name == "scale":
        step_size = node.hyperparams.get("step_size")
        if _is_scalar(step_size):
            step_size = step_size.item()
        if isinstance(step_size, numbers.Number):
            if step_size == -1:
                return None, True
            if step_size < 0 or (sign_flipped and step_size > 0):
                return abs(float(step_size)), sign_flipped
    if node.name == "partition":  # each transform has a rate of its own: the first one's
        rates = (_find_learning_rate(child, sign_flipped=False) for child in node.children)
        return next(((lr, flip) for lr, flip in rates if lr is not None), (None, sign_flipped))
    # Children run first to last; the learning rate is applied after the update direction,
    # so the search goes from the end, remembering a sign flip met on the way.
    for child in reversed(node.children):
        found, sign_flipped = _find_learning_rate(child, sign_flipped)
        if found is not None:
            return found, sign_flipped
    return None, sign_flipped
