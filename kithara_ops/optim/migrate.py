"""Carrying optimizer state between the Keras and Optax versions of the same algorithm.

Adam and AdamW keep the same two moments in both families,

.. math:: m_t = \\beta_1 m_{t-1} + (1-\\beta_1) g_t, \\qquad v_t = \\beta_2 v_{t-1} + (1-\\beta_2) g_t^2,

so they move across unchanged, with Keras' ``iteration`` as Optax's ``count``. The families
differ in where epsilon enters: Keras applies
:math:`\\alpha_t\\, m_t / (\\sqrt{v_t} + \\epsilon)` with
:math:`\\alpha_t = \\eta \\sqrt{1-\\beta_2^t}/(1-\\beta_1^t)`, Optax
:math:`\\eta\\, \\hat m_t / (\\sqrt{\\hat v_t} + \\epsilon)`, i.e. Keras' epsilon is Optax's
scaled by :math:`\\sqrt{1-\\beta_2^t}`; with the default epsilons (1e-7, 1e-8) the updates
differ only where :math:`\\sqrt{v}` is of the order of epsilon.

SGD with momentum keeps different quantities: Keras :math:`u_t = \\mu u_{t-1} - \\eta g_t`
(learning rate inside), Optax :math:`b_t = \\mu b_{t-1} + g_t` (outside), so
:math:`u = -\\eta\\, b`, exact for a constant learning rate and taken at the current rate for a
schedule.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import keras
import optax

_SAME_ALGORITHM = {("adam", "adam"), ("adamw", "adamw"), ("sgd", "sgd")}


def migrate_state(
    saved: dict[str, Any],
    saved_state: Any,
    adapter: Any,
    params: dict,
    meta: dict,
    keys: list[str],
) -> Any | None:
    """The current optimizer's state, built from a saved state of the other family.

    Args:
      saved: the saved optimizer's description (``describe_optimizer``).
      saved_state: its state as restored (Keras: ``{key: array}``; Optax: nested dicts/lists).
      adapter: the current optimizer adapter.
      params: the restored parameters, ``{key: array}``.
      meta: the checkpoint metadata (for the saved variable keys, in model order).
      keys: the current parameter keys in model order (``params`` itself is key-sorted).

    Returns:
      The new state, every array in one place only, or ``None`` when no translation applies
      (different algorithms, the same family, or variants such as AMSGrad or Nesterov whose
      state does not carry over).
    """
    from kithara_ops.optim.describe import describe_optimizer

    current = describe_optimizer(adapter.optimizer)
    pair = (saved.get("name"), current["name"])
    if saved.get("family") == current["family"] or pair not in _SAME_ALGORITHM:
        return None
    for description in (saved, current):
        hyper = description.get("hyperparams", {})
        if hyper.get("amsgrad") or hyper.get("nesterov"):
            return None
    saved_keys = meta.get("keys", {}).get("params", keys)
    fresh = adapter.init(params)
    if current["family"] == "optax":
        state = _keras_to_optax(current["name"], saved_state, fresh, saved_keys, keys, saved, meta)
    else:
        state = _optax_to_keras(current["name"], saved_state, fresh, keys, current, adapter)
    return None if state is None else _unshared(state)


def _unshared(tree: Any) -> Any:
    """``tree`` with a copy of every array that appears in it a second time.

    The step donates the state's buffers, and one buffer cannot be donated twice; yet an
    Optax optimizer with a schedule keeps its step count in two places (its own and the
    schedule's), which ``tree_set`` fills with one array.
    """
    seen: set[int] = set()

    def own(leaf):
        if not isinstance(leaf, jax.Array) or id(leaf) not in seen:
            seen.add(id(leaf))
            return leaf
        return jnp.array(leaf, copy=True)

    return jax.tree.map(own, tree)


def _slot(path: str, name: str) -> str:
    """The key Keras gives a parameter's slot variable (its path, slashes as underscores)."""
    return f"{path.replace('/', '_')}_{name}"


def _keras_to_optax(name, keras_state, fresh, saved_keys, keys, saved, meta):
    iteration = next(v for k, v in keras_state.items() if k.endswith("iteration"))
    count = jnp.asarray(iteration, jnp.int32)
    if name in ("adam", "adamw"):
        mu = {k: keras_state[_slot(s, "momentum")] for s, k in zip(saved_keys, keys)}
        nu = {k: keras_state[_slot(s, "velocity")] for s, k in zip(saved_keys, keys)}
        return optax.tree_utils.tree_set(fresh, mu=mu, nu=nu, count=count)
    has_trace = bool(optax.tree_utils.tree_get_all_with_path(fresh, "trace"))
    if _slot(saved_keys[0], "momentum") not in keras_state or not has_trace:
        return None  # momentum on one side only (or neither): nothing carries over
    lr = _learning_rate_at(saved, int(iteration))
    trace = {k: -keras_state[_slot(s, "momentum")] / lr for s, k in zip(saved_keys, keys)}
    # Only a schedule keeps a count in optax.sgd's state.
    has_count = bool(optax.tree_utils.tree_get_all_with_path(fresh, "count"))
    return optax.tree_utils.tree_set(fresh, trace=trace, **({"count": count} if has_count else {}))


def _optax_to_keras(name, optax_state, fresh, keys, current, adapter):
    found = _find(optax_state, ("mu", "nu") if name != "sgd" else ("trace",))
    if found is None:
        return None
    counts = [v for k, v in _items(optax_state) if k == "count"]
    out = dict(fresh)
    iteration_key = next(k for k in out if k.endswith("iteration"))
    if counts:
        out[iteration_key] = jnp.asarray(counts[0], out[iteration_key].dtype)
    if name == "sgd" and _slot(keys[0], "momentum") not in out:
        return None  # the Keras SGD has no momentum to carry the trace into
    for key in keys:
        if name == "sgd":
            lr = _learning_rate_at(current, int(out[iteration_key]))
            out[_slot(key, "momentum")] = -lr * found["trace"][key]
        else:
            out[_slot(key, "momentum")] = found["mu"][key]
            out[_slot(key, "velocity")] = found["nu"][key]
    return out


def _learning_rate_at(description: dict, step: int) -> float:
    """The learning rate at ``step``: a constant, a Keras schedule rebuilt from its config,
    or (when only text describes the schedule) its peak."""
    lr = description.get("learning_rate")
    if isinstance(lr, int | float):
        return float(lr)
    config = (description.get("tree") or {}).get("config") or {}
    schedule_config = config.get("learning_rate") if isinstance(config, dict) else None
    if isinstance(schedule_config, dict) and "class_name" in schedule_config:
        schedule = keras.optimizers.schedules.deserialize(schedule_config)
        return float(schedule(step))
    schedule = description.get("learning_rate_schedule") or {}
    for key in ("peak", "init_value", "initial_learning_rate", "init"):
        if isinstance(schedule.get(key), int | float) and schedule[key] > 0:
            return float(schedule[key])
    raise ValueError("the learning rate of the saved SGD is not a number")


def _find(tree: Any, fields: tuple[str, ...]) -> dict | None:
    """The first dict (or NamedTuple) in ``tree`` that has all of ``fields``."""
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        tree = tree._asdict()
    if isinstance(tree, dict):
        if all(f in tree for f in fields):
            return tree
        children = tree.values()
    elif isinstance(tree, list | tuple):
        children = tree
    else:
        return None
    for child in children:
        found = _find(child, fields)
        if found is not None:
            return found
    return None


def _items(tree: Any):
    """Every ``(key, value)`` pair of the dicts and NamedTuples in ``tree``."""
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        tree = tree._asdict()
    if isinstance(tree, dict):
        for k, v in tree.items():
            if isinstance(v, jax.Array | int):
                yield k, v
            yield from _items(v)
    elif isinstance(tree, list | tuple):
        for v in tree:
            yield from _items(v)
