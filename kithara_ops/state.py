"""``TrainState``: everything that changes during training, as one pytree.

Parameters and non-trainable variables are dicts keyed by Keras variable path, so that
checkpoints, Optax masks and sharding rules all speak the same names.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np

from kithara_ops import distributed
from kithara_ops.sharding import LayoutRule, local_shard_bytes, parameter_shardings, replicated


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """The whole mutable state of a run; the jit-compiled step maps it to the next one.

    Attributes:
      step: number of optimizer steps taken (int32 scalar).
      params: trainable variables, ``{path: array}``.
      non_trainable: non-trainable variables (norm statistics, RNG seed states), ``{path: array}``.
      opt_state: the optimizer's state pytree (Keras optimizer variables or Optax state).
      rng: the key the step derives all its randomness from (dropout seeds).
    """

    step: jax.Array
    params: dict[str, jax.Array]
    non_trainable: dict[str, jax.Array]
    opt_state: Any
    rng: jax.Array


def variable_keys(variables: list[keras.Variable]) -> list[str]:
    """Unique dict keys for ``variables``: their paths, suffixed ``#n`` where paths repeat."""
    seen: dict[str, int] = {}
    keys = []
    for var in variables:
        n = seen.get(var.path, 0)
        seen[var.path] = n + 1
        keys.append(var.path if n == 0 else f"{var.path}#{n}")
    return keys


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point value of ``tree`` is finite (one device reduction)."""
    checks = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree.leaves(tree)
        if jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


SEED_STATE = "seed_generator_state"
"""Path suffix of Keras' RNG seed variables (non-trainable, rewritten from the key each step)."""


def key_groups(
    model: keras.Model, adapter: Any, restorable: Iterable[int] = ()
) -> dict[str, list[str]]:
    """The state's variable keys by group, in the model's (and a Keras optimizer's) order.

    Checkpoints record them, so a rebuilt model whose layers Keras named differently is
    matched by position. The group ``frozen`` names the non-trainable variables at the
    positions ``restorable`` (in ``model.non_trainable_variables``): those a preset holds and
    no step writes (a LoRA model's base, not its normalisation statistics). The step keeps
    them as they are and checkpoints leave them out (see ``saved_part``).
    """
    groups = {
        "params": variable_keys(model.trainable_variables),
        "non_trainable": variable_keys(model.non_trainable_variables),
    }
    if adapter.state_keys is not None:
        groups["opt"] = list(adapter.state_keys)
    wanted = set(restorable)
    frozen = [
        k
        for i, k in enumerate(groups["non_trainable"])
        if i in wanted and not k.endswith(SEED_STATE)
    ]
    if frozen:
        groups["frozen"] = frozen
    return groups


def saved_part(state: TrainState, frozen: Iterable[str]) -> TrainState:
    """``state`` without the ``frozen`` non-trainable entries: what a checkpoint holds.

    Works on arrays and on abstract (``ShapeDtypeStruct``) states alike.
    """
    left_out = set(frozen)
    kept = {k: v for k, v in state.non_trainable.items() if k not in left_out}
    return dataclasses.replace(state, non_trainable=kept)


def placed_variables(
    model: keras.Model, keys: Sequence[str], shardings: dict[str, Any]
) -> dict[str, jax.Array]:
    """The model's non-trainable variables named ``keys``, placed by ``shardings``.

    Each is placed straight into its sharding (never whole on one device first, where the
    variable is already distributed), sharing the variable's buffers where it is placed
    alike: how a restore fills in the frozen base a checkpoint leaves out.
    """
    wanted = set(keys)
    return {
        key: jax.device_put(var.value, shardings[key], may_alias=True)
        for key, var in zip(
            variable_keys(model.non_trainable_variables), model.non_trainable_variables
        )
        if key in wanted
    }


def state_bytes(tree: Any) -> dict[str, int]:
    """The size of a placed state: ``total`` bytes (every array once) and ``per_device``.

    ``per_device`` is the most any one (local) device holds, read from the arrays' shardings
    (``sharding.local_shard_bytes``): a replicated array counts in full on every device, a
    sharded one by its shard. It is what sharding saves, and what a device's memory must hold
    besides the step's activations.
    """
    held: dict[Any, int] = {}
    total = 0
    for leaf in jax.tree.leaves(tree):
        total += leaf.nbytes
        for device, nbytes in local_shard_bytes(leaf).items():
            held[device] = held.get(device, 0) + nbytes
    return {"total": int(total), "per_device": int(max(held.values(), default=0))}


def state_shardings(
    mesh: jax.sharding.Mesh,
    model: keras.Model,
    adapter: Any,
    layout_rules: Sequence[LayoutRule],
    min_shard_size: int,
) -> TrainState:
    """The sharding of every array of the state, decided once, before anything is placed.

    Parameters and non-trainable variables follow the same layout rules and size threshold:
    a frozen base model (LoRA) is split like a trainable one, never copied whole to every
    device. The RNG seed states stay replicated (the step rewrites them from the key each
    step); the optimizer state is placed by its adapter from an abstract state (nothing is
    computed); step and key are replicated.
    """
    repl = replicated(mesh)
    params = model.trainable_variables
    param_keys = variable_keys(params)
    shapes = {k: tuple(v.shape) for k, v in zip(param_keys, params)}
    param_shardings = parameter_shardings(mesh, shapes, layout_rules, min_shard_size)
    frozen_keys = variable_keys(model.non_trainable_variables)
    frozen_shapes = {
        k: tuple(v.shape)
        for k, v in zip(frozen_keys, model.non_trainable_variables)
        if not k.endswith(SEED_STATE)
    }
    frozen = parameter_shardings(mesh, frozen_shapes, layout_rules, min_shard_size)
    abstract_params = {
        k: jax.ShapeDtypeStruct(shapes[k], v.dtype) for k, v in zip(param_keys, params)
    }
    abstract_opt = jax.eval_shape(adapter.init, abstract_params)
    return TrainState(
        step=repl,
        params=param_shardings,
        non_trainable={k: frozen.get(k, repl) for k in frozen_keys},
        opt_state=adapter.state_shardings(abstract_opt, param_shardings, repl),
        rng=repl,
    )


def initial_state(
    model: keras.Model,
    shardings: TrainState,
    init_optimizer: Callable[[dict[str, jax.Array]], Any],
    seed: int,
    shared: Collection[str] = (),
) -> TrainState:
    """A fresh state from ``model``'s current variables, placed by ``shardings``.

    The arrays are copies (the state is donated to the step, the Keras variables are not),
    except the non-trainable entries named in ``shared`` (frozen weights the step takes
    undonated, see ``step.FrozenAside``): those share the variables' device buffers where
    they are placed alike. ``init_optimizer`` maps the placed parameters to the optimizer's
    placed initial state.
    """
    put = lambda value, sharding: jax.device_put(value, sharding, may_alias=False)  # noqa: E731
    params = {
        key: put(var.value, shardings.params[key])
        for key, var in zip(variable_keys(model.trainable_variables), model.trainable_variables)
    }
    non_trainable = {
        key: jax.device_put(var.value, shardings.non_trainable[key], may_alias=key in shared)
        for key, var in zip(
            variable_keys(model.non_trainable_variables), model.non_trainable_variables
        )
    }
    return TrainState(
        step=put(np.int32(0), shardings.step),
        params=params,
        non_trainable=non_trainable,
        opt_state=init_optimizer(params),
        rng=put(jax.random.PRNGKey(seed), shardings.rng),
    )


def abstract_state(build: Callable[[], TrainState], shardings: TrainState) -> TrainState:
    """The shapes and dtypes ``build`` would give, with ``shardings``: no array is made."""
    shapes = jax.eval_shape(build)  # traced: nothing is computed or placed
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        shapes,
        shardings,
    )


def write_back(
    state: TrainState, model: keras.Model, key_groups: dict[str, list[str]], adapter: Any
) -> None:
    """Assign a trained state to the Keras model's variables and the optimizer object.

    The model receives the parameters to evaluate (``adapter.eval_params``: a schedule-free
    optimizer's average rather than its gradient point); the optimizer object its state.
    In a multi-process run full copies are gathered first, so every process takes part.
    """
    evaluated = adapter.eval_params(state.params, state.opt_state)
    params, non_trainable = distributed.process_local((evaluated, state.non_trainable))
    for key, var in zip(key_groups["params"], model.trainable_variables):
        var.assign(params[key])
    frozen = set(key_groups.get("frozen", ()))
    for key, var in zip(key_groups["non_trainable"], model.non_trainable_variables):
        # A frozen weight still on the devices already shares the state's buffers (an
        # assignment would re-place it as a copy); one parked on the host takes them back.
        if key not in frozen or not isinstance(var._value, jax.Array):
            var.assign(non_trainable[key])
    adapter.write_back(distributed.process_local(state.opt_state))


@contextlib.contextmanager
def parked_on_host(variables: Sequence[keras.Variable]) -> Iterator[None]:
    """Keep ``variables``' values in host memory while a ``TrainState`` holds the live copy.

    While the Trainer trains, its ``TrainState`` is the copy that changes; the Keras model's
    and a Keras optimizer's own device buffers would only hold the values from before
    training, at the cost of the parameters' size (plus twice that for Adam's slots) in
    device memory. They move to host memory instead, where they stay readable. On exit every
    variable still parked goes back to the device, so a run that fails leaves the Keras
    objects as they were; variables assigned in the meantime (the write-back of the trained
    values) are left alone.

    Variables placed by a Keras distribution are left on the device: assigning to them
    re-distributes the value, so they cannot be parked.
    """
    parked = []
    for var in variables:
        value = var._value
        if isinstance(value, jax.Array) and getattr(var, "_layout", None) is None:
            host = np.asarray(jax.device_get(value))
            var._value = host
            parked.append((var, host))
    try:
        yield
    finally:
        for var, host in parked:
            if var._value is host:
                var.assign(host)
