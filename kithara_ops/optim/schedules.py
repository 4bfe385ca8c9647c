"""Describing learning-rate schedules (Optax functions, Keras schedule configs) as data.

An Optax schedule is a closure; its factory's name and closed-over values say what it is
(``warmup_cosine_decay_schedule`` is a ``join_schedules`` of a linear warm-up and a cosine
decay, and is recognised as such). A Keras schedule is described from its config.
"""

from __future__ import annotations

import functools
import numbers
import re
from typing import Any

import jax
import numpy as np

from kithara_ops.optim.introspect import closure_values, factory_name

_LINEAR = ("init_value", "end_value", "transition_steps", "transition_begin")
_COUNTS = {"decay_steps", "transition_steps", "transition_begin", "warmup_steps"}


_OPTAX_SCHEDULES = {  # factory -> (kind, closure parameters in the factory's order)
    "cosine_decay_schedule": ("cosine_decay", ("init_value", "decay_steps", "alpha", "exponent")),
    "exponential_decay": ("exponential_decay", ("init_value", "transition_steps", "decay_rate",
                          "transition_begin", "staircase", "end_value")),
    "constant_schedule": ("constant", ("value",)),
    "piecewise_constant_schedule": ("piecewise_constant", ("init_value", "boundaries_and_scales")),
}  # fmt: skip


def _schedule_values(fn: Any) -> dict[str, Any]:
    """A schedule's closure, its step counts as whole numbers: some schedules turn them into
    floats the first time they are called (cosine_decay_schedule's ``nonlocal decay_steps``),
    and a description must not change when a step has been taken."""
    return {k: _whole(v) if k in _COUNTS else v for k, v in closure_values(fn).items()}


def describe_optax_schedule(fn: Any) -> dict[str, Any]:
    """``{"kind": ..., <params>}`` for an Optax schedule, read from its closure."""
    kind, values = factory_name(fn), _schedule_values(fn)
    if kind == "join_schedules" and (warmup := _warmup_schedule(values)) is not None:
        return warmup
    if kind == "join_schedules" and (cycles := _sgdr(values)) is not None:
        return cycles
    if kind == "piecewise_interpolate_schedule" and (one := _onecycle(values)) is not None:
        return one
    if kind == "polynomial_schedule":
        power_1 = values.get("power") == 1
        kind, keys = ("linear", _LINEAR) if power_1 else ("polynomial", (*_LINEAR, "power"))
    elif kind in _OPTAX_SCHEDULES:
        kind, keys = _OPTAX_SCHEDULES[kind]
    else:  # read what the closure holds; nested Optax schedules are described in turn
        kind = kind if kind != "unknown" else getattr(fn, "__qualname__", type(fn).__qualname__)
        keys, values = tuple(values), {k: _nested(v) for k, v in values.items()}
    return {"kind": kind, **{k: json_safe(values[k]) for k in keys if k in values}}


def _nested(value: Any) -> Any:
    """Schedules inside a schedule's closure (``join_schedules``), described in turn."""
    if callable(value) and factory_name(value) != "unknown":
        return describe_optax_schedule(value)
    if isinstance(value, list | tuple) and value and all(map(callable, value)):
        return [_nested(v) for v in value]
    return value


def _warmup_schedule(values: dict[str, Any]) -> dict[str, Any] | None:
    """``warmup_cosine`` / ``warmup_exponential_decay`` from their ``join_schedules`` form."""
    boundaries, parts = list(values.get("boundaries") or []), list(values.get("schedules") or [])
    if len(parts) != 2 or len(boundaries) != 1 or factory_name(parts[0]) != "polynomial_schedule":
        return None
    warm, main = _schedule_values(parts[0]), _schedule_values(parts[1])
    if (warm.get("power"), warm.get("transition_begin")) != (1, 0):
        return None
    head = {"init": warm.get("init_value"), "peak": warm.get("end_value"), "warmup_steps": boundaries[0]}  # fmt: skip
    if factory_name(parts[1]) == "cosine_decay_schedule":
        # Optax gives the cosine part decay_steps - warmup_steps and alpha = end / peak.
        end = float(f"{float(main['alpha']) * float(head['peak']):.12g}")
        # The cosine part's decay_steps is a float once it was called: a count again.
        tail = {"decay_steps": _whole(json_safe(main["decay_steps"] + boundaries[0])), "end": end}
        if main.get("exponent") != 1.0:
            tail["exponent"] = main.get("exponent")
        return json_safe({"kind": "warmup_cosine", **head, **tail})
    if factory_name(parts[1]) == "exponential_decay":
        keys = ("transition_steps", "decay_rate", "transition_begin", "staircase")
        tail = {**{k: main.get(k) for k in keys}, "end": main.get("end_value")}
        return json_safe({"kind": "warmup_exponential_decay", **head, **tail})
    return None


def _whole(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _exact(value: float) -> float:
    """``value`` at 12 significant digits: 0.01, not 0.010000000000000002, after a product."""
    return float(f"{float(value):.12g}")


def _onecycle(values: dict[str, Any]) -> dict[str, Any] | None:
    """``cosine_onecycle`` / ``linear_onecycle`` from the piecewise interpolation they build.

    Optax builds them from ``init = peak / div_factor`` with boundaries at
    ``int(pct_start * T)`` (and ``int(pct_final * T)``), ``T``, and
    scales ``div_factor`` then ``1 / (div_factor * final_div_factor)`` (cosine) or
    ``1 / div_factor`` then ``1 / final_div_factor`` (linear).
    """
    interpolate = getattr(values.get("interpolate_fn"), "__name__", "")
    bounds, scales = list(values.get("boundaries") or []), list(values.get("scales") or [])
    init = values.get("init_value")
    if not isinstance(init, int | float) or not bounds or len(bounds) != len(scales):
        return None
    steps, div = bounds[-1], float(scales[0])
    head = {"transition_steps": steps, "peak_value": _exact(init * div), "pct_start": _exact(bounds[0] / steps)}  # fmt: skip
    if interpolate == "_cosine_interpolate" and len(bounds) == 2:
        tail = {"div_factor": _exact(div), "final_div_factor": _exact(1 / (scales[1] * div))}
        return {"kind": "cosine_onecycle", **head, **tail}
    if interpolate == "_linear_interpolate" and len(bounds) == 3:
        tail = {"pct_final": _exact(bounds[1] / steps), "div_factor": _exact(div), "final_div_factor": _exact(1 / scales[2])}  # fmt: skip
        return {"kind": "linear_onecycle", **head, **tail}
    return None


def _sgdr(values: dict[str, Any]) -> dict[str, Any] | None:
    """``sgdr``: warm restarts, a ``join_schedules`` of warm-up cosine cycles."""
    parts = list(values.get("schedules") or [])
    cycles = [describe_optax_schedule(part) for part in parts]
    if len(cycles) < 2 or any(c.get("kind") != "warmup_cosine" for c in cycles):
        return None
    return {"kind": "sgdr", "cycles": [{k: v for k, v in c.items() if k != "kind"} for c in cycles]}


def describe_keras_schedule(config: dict[str, Any]) -> dict[str, Any]:
    """``{"kind": "cosine_decay", <config>}`` for a serialised Keras schedule."""
    kind = re.sub(r"(?<!^)(?=[A-Z])", "_", str(config.get("class_name", "schedule"))).lower()
    params = {k: v for k, v in (config.get("config") or {}).items() if k != "name"}
    return {"kind": kind, **json_safe(params)}


def schedule_text(schedule: Any) -> str:
    """``kind(k=v, ...)`` for a structured schedule (or an Optax schedule function)."""
    schedule = schedule if isinstance(schedule, dict) else describe_optax_schedule(schedule)
    return call_text(schedule["kind"], {k: v for k, v in schedule.items() if k != "kind"})


def describe_learning_rate(lr: Any) -> tuple[Any, dict[str, Any] | None]:
    """(number or schedule text, structured schedule or None) of a learning rate."""
    if isinstance(lr, dict) and "class_name" in lr:
        schedule = describe_keras_schedule(lr)
    elif callable(lr):
        schedule = describe_optax_schedule(getattr(lr, "schedule_fn", lr))
    else:
        return json_safe(lr), None
    return schedule_text(schedule), schedule


def call_text(name: str, args: dict[str, Any]) -> str:
    return f"{name}({', '.join(f'{k}={value_text(v)}' for k, v in args.items())})"


def value_text(value: Any) -> str:
    """Readable text: floats as short as exact (``1e-08``, ``0.001``), schedules as calls."""
    if isinstance(value, dict) and "kind" in value:
        return schedule_text(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{value_text(k)}: {value_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, float):
        short = format(value, ".6g")
        return repr(value) if float(short) == value else short
    return str(value)


def short_number(value: Any) -> str:
    """Compact number for labels: ``1e-3``, ``3e-4``, ``0.01``, ``2.5e-5``."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return str(value)
    if value == 0 or 1e-2 <= abs(value) < 1e4:
        return format(value, ".3g")
    mantissa, exponent = format(value, ".2e").split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def callable_name(fn: Any) -> str:
    if isinstance(fn, functools.partial):
        return f"partial({callable_name(fn.func)})"
    if factory_name(fn) != "unknown":
        return factory_name(fn)
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__


def json_safe(value: Any) -> Any:
    """Plain JSON values: NumPy/JAX scalars to numbers, dtypes to text, callables to names."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic | np.ndarray | jax.Array):
        array = np.asarray(value)
        if array.ndim == 0:
            return array.item()
        return array.tolist() if array.size <= 64 else f"array({array.shape}, {array.dtype})"
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
        return str(np.dtype(value))
    if isinstance(getattr(value, "dtype", None), np.dtype) and not hasattr(value, "shape"):
        return str(value.dtype)  # jnp.float32 and friends
    if isinstance(value, dict):
        plain = (str, int, float, bool, type(None))
        return {k if isinstance(k, plain) else str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    return callable_name(value) if callable(value) else str(value)
