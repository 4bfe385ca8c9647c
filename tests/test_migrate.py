"""Unit tests for ``kithara_ops.optim.migrate``: optimizer state carried between Keras and Optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest

from kithara_ops.optim import as_adapter
from kithara_ops.optim.describe import describe_optimizer
from kithara_ops.optim.migrate import migrate_state
from kithara_ops.state import variable_keys

# --------------------------------------------------------------------------- helpers

SHAPES = [(2, 3), (3,)]


def layer_variables(name: str) -> list[keras.Variable]:
    layer = keras.layers.Dense(3, name=name)
    layer.build((None, 2))
    return layer.trainable_variables  # kernel (2, 3), bias (3,)


def numbers(seed: int, shape, positive: bool = False) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return np.abs(x) + 0.01 if positive else x


def params_for(keys: list[str]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(numbers(10 + i, s)) for i, (k, s) in enumerate(zip(keys, SHAPES))}


def grads_for(keys: list[str]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(numbers(20 + i, s)) for i, (k, s) in enumerate(zip(keys, SHAPES))}


def slot(path: str, name: str) -> str:
    # Keras names a slot after its variable's path with slashes as underscores.
    return path.replace("/", "_") + "_" + name


def keras_state(adapter, keys: list[str], iteration: int, slots: tuple[str, ...]) -> dict:
    """The adapter's fresh state with the iteration and every slot set to known numbers."""
    state = dict(adapter.init(None))
    # A constant learning rate is a variable too; a schedule is not.
    assert set(state) - {"learning_rate"} == {"iteration"} | {
        slot(k, s) for k in keys for s in slots
    }
    state["iteration"] = jnp.int32(iteration)
    for i, key in enumerate(keys):
        for j, name in enumerate(slots):
            positive = name == "velocity"
            state[slot(key, name)] = jnp.asarray(numbers(30 + 10 * i + j, SHAPES[i], positive))
    return state


def plain(tree):
    """NamedTuples as dicts and tuples as lists: the nested shape a restored state can have."""
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return {k: plain(v) for k, v in tree._asdict().items()}
    if isinstance(tree, list | tuple):
        return [plain(v) for v in tree]
    if isinstance(tree, dict):
        return {k: plain(v) for k, v in tree.items()}
    return tree


def find(tree, field: str):
    return optax.tree_utils.tree_get(tree, field)


def migrate(saved_opt, saved_state, current_opt, keys, saved_keys=None):
    # A Keras adapter's slots are named after its variables: give them the current keys.
    variables = layer_variables(keys[0].split("/")[0])
    assert variable_keys(variables) == keys
    adapter = as_adapter(current_opt, variables)
    meta = {"keys": {"params": saved_keys or keys}}
    result = migrate_state(
        describe_optimizer(saved_opt), saved_state, adapter, params_for(keys), meta, keys
    )
    return result, adapter


# --------------------------------------------------------------------------- Adam


def test_keras_adam_to_optax_carries_moments_and_count_by_model_order():
    saved_keys = variable_keys(layer_variables("old"))
    keys = ["new/kernel", "new/bias"]  # renamed since: matched by position
    saved = keras.optimizers.Adam(1e-3)
    state = keras_state(
        as_adapter(saved, layer_variables("old")), saved_keys, 5, ("momentum", "velocity")
    )

    result, adapter = migrate(saved, state, optax.adam(1e-3), keys, saved_keys)

    assert jax.tree.structure(result) == jax.tree.structure(adapter.init(params_for(keys)))
    for s, k in zip(saved_keys, keys):
        np.testing.assert_array_equal(find(result, "mu")[k], state[slot(s, "momentum")])
        np.testing.assert_array_equal(find(result, "nu")[k], state[slot(s, "velocity")])
    count = find(result, "count")
    assert int(count) == 5 and count.dtype == jnp.int32


def test_migrated_optax_adam_takes_the_step_adam_would_take_at_that_count():
    keys = variable_keys(layer_variables("old"))
    saved = keras.optimizers.Adam(1e-3)
    state = keras_state(
        as_adapter(saved, layer_variables("old")), keys, 5, ("momentum", "velocity")
    )
    result, adapter = migrate(saved, state, optax.adam(1e-3), keys)

    params, grads = params_for(keys), grads_for(keys)
    new_params, _, lr = adapter.update(grads, result, params, jnp.float32(0))
    assert float(lr) == pytest.approx(1e-3)
    t = 6  # the sixth step after five saved ones
    for k in keys:
        m = 0.9 * np.asarray(state[slot(k, "momentum")]) + 0.1 * np.asarray(grads[k])
        v = 0.999 * np.asarray(state[slot(k, "velocity")]) + 0.001 * np.asarray(grads[k]) ** 2
        m_hat, v_hat = m / (1 - 0.9**t), v / (1 - 0.999**t)
        want = np.asarray(params[k]) - 1e-3 * m_hat / (np.sqrt(v_hat) + 1e-8)
        np.testing.assert_allclose(np.asarray(new_params[k]), want, rtol=1e-5, atol=1e-7)


def test_keras_adam_with_a_schedule_to_optax_gives_each_count_its_own_buffer():
    keys = variable_keys(layer_variables("old"))
    saved = keras.optimizers.Adam(keras.optimizers.schedules.ExponentialDecay(1e-3, 10, 0.5))
    state = keras_state(
        as_adapter(saved, layer_variables("old")), keys, 5, ("momentum", "velocity")
    )
    result, adapter = migrate(
        saved, state, optax.adam(optax.exponential_decay(1e-3, 10, 0.5)), keys
    )

    counts = [v for _, v in optax.tree_utils.tree_get_all_with_path(result, "count")]
    assert len(counts) == 2 and [int(c) for c in counts] == [5, 5]  # Adam's and the schedule's
    # The step donates the state: each count must be a buffer of its own.
    step = jax.jit(adapter.update, donate_argnums=1)
    _, after, lr = step(grads_for(keys), result, params_for(keys), jnp.float32(0))
    assert float(lr) == pytest.approx(1e-3 * 0.5 ** (5 / 10))  # the rate at the saved count
    assert [int(v) for _, v in optax.tree_utils.tree_get_all_with_path(after, "count")] == [6, 6]


@pytest.mark.parametrize("restored_form", [False, True])
def test_optax_adam_to_keras_fills_slots_and_iteration(restored_form):
    keys = variable_keys(layer_variables("old"))
    tx = optax.adam(2e-3)
    opt_state = tx.init(params_for(keys))
    mu = {k: jnp.asarray(numbers(40 + i, s)) for i, (k, s) in enumerate(zip(keys, SHAPES))}
    nu = {k: jnp.asarray(numbers(50 + i, s, True)) for i, (k, s) in enumerate(zip(keys, SHAPES))}
    opt_state = optax.tree_utils.tree_set(opt_state, mu=mu, nu=nu, count=jnp.int32(7))
    saved_state = plain(opt_state) if restored_form else opt_state

    result, adapter = migrate(tx, saved_state, keras.optimizers.Adam(2e-3), keys)

    fresh = adapter.init(None)
    assert set(result) == set(fresh)
    assert int(result["iteration"]) == 7 and result["iteration"].dtype == fresh["iteration"].dtype
    for k in keys:
        np.testing.assert_array_equal(result[slot(k, "momentum")], mu[k])
        np.testing.assert_array_equal(result[slot(k, "velocity")], nu[k])
    np.testing.assert_allclose(float(result["learning_rate"]), 2e-3, rtol=1e-6)

    # One Keras step from the migrated state follows Keras' Adam at iteration 8.
    params, grads = params_for(keys), grads_for(keys)
    new_params, new_state, _ = adapter.update(grads, result, params, jnp.float32(0))
    t = 8
    alpha = 2e-3 * np.sqrt(1 - 0.999**t) / (1 - 0.9**t)
    for k in keys:
        m = 0.9 * np.asarray(mu[k]) + 0.1 * np.asarray(grads[k])
        v = 0.999 * np.asarray(nu[k]) + 0.001 * np.asarray(grads[k]) ** 2
        want = np.asarray(params[k]) - alpha * m / (np.sqrt(v) + 1e-7)
        np.testing.assert_allclose(np.asarray(new_params[k]), want, rtol=1e-5, atol=1e-7)
    assert int(new_state["iteration"]) == 8


def test_adam_round_trip_keras_optax_keras_is_the_identity():
    keys = variable_keys(layer_variables("old"))
    keras_opt = keras.optimizers.AdamW(1e-3, weight_decay=0.01)
    start = keras_state(
        as_adapter(keras_opt, layer_variables("old")), keys, 3, ("momentum", "velocity")
    )
    optax_opt = optax.adamw(1e-3, weight_decay=0.01)
    there, _ = migrate(keras_opt, start, optax_opt, keys)
    back, _ = migrate(optax_opt, there, keras.optimizers.AdamW(1e-3, weight_decay=0.01), keys)
    assert set(back) == set(start)
    for key in start:
        if key != "learning_rate":
            np.testing.assert_array_equal(np.asarray(back[key]), np.asarray(start[key]), key)


# --------------------------------------------------------------------------- SGD with momentum


def test_keras_sgd_momentum_to_optax_trace_is_minus_u_over_lr():
    keys = variable_keys(layer_variables("old"))
    saved = keras.optimizers.SGD(0.1, momentum=0.9)
    state = keras_state(as_adapter(saved, layer_variables("old")), keys, 4, ("momentum",))
    # A schedule-valued Optax learning rate keeps a step count the migration can set.
    target = optax.sgd(optax.constant_schedule(0.1), momentum=0.9)

    result, adapter = migrate(saved, state, target, keys)

    for k in keys:
        np.testing.assert_allclose(
            np.asarray(find(result, "trace")[k]),
            -np.asarray(state[slot(k, "momentum")]) / 0.1,
            rtol=1e-6,
        )
    assert int(find(result, "count")) == 4

    # The next step matches Keras' u' = 0.9 u - 0.1 g, p' = p + u' from the saved state.
    params, grads = params_for(keys), grads_for(keys)
    new_params, _, _ = adapter.update(grads, result, params, jnp.float32(0))
    for k in keys:
        u = 0.9 * np.asarray(state[slot(k, "momentum")]) - 0.1 * np.asarray(grads[k])
        np.testing.assert_allclose(
            np.asarray(new_params[k]), np.asarray(params[k]) + u, rtol=1e-5, atol=1e-6
        )


def test_optax_sgd_trace_to_keras_momentum_is_minus_lr_times_b():
    keys = variable_keys(layer_variables("old"))
    tx = optax.sgd(0.05, momentum=0.8)
    trace = {k: jnp.asarray(numbers(60 + i, s)) for i, (k, s) in enumerate(zip(keys, SHAPES))}
    opt_state = optax.tree_utils.tree_set(tx.init(params_for(keys)), trace=trace)

    result, adapter = migrate(tx, opt_state, keras.optimizers.SGD(0.05, momentum=0.8), keys)

    assert set(result) == set(adapter.init(None))
    for k in keys:
        np.testing.assert_allclose(
            np.asarray(result[slot(k, "momentum")]), -0.05 * np.asarray(trace[k]), rtol=1e-6
        )
    # Optax's next step p - 0.05 (0.8 b + g) is what Keras now takes.
    params, grads = params_for(keys), grads_for(keys)
    new_params, _, _ = adapter.update(grads, result, params, jnp.float32(0))
    for k in keys:
        b = 0.8 * np.asarray(trace[k]) + np.asarray(grads[k])
        np.testing.assert_allclose(
            np.asarray(new_params[k]), np.asarray(params[k]) - 0.05 * b, rtol=1e-5, atol=1e-6
        )


def test_optax_sgd_with_a_schedule_to_keras_takes_its_count():
    keys = variable_keys(layer_variables("old"))
    tx = optax.sgd(optax.linear_schedule(0.1, 0.01, 100), momentum=0.9)
    trace = {k: jnp.asarray(numbers(70 + i, s)) for i, (k, s) in enumerate(zip(keys, SHAPES))}
    opt_state = optax.tree_utils.tree_set(tx.init(params_for(keys)), trace=trace, count=12)
    result, _ = migrate(tx, opt_state, keras.optimizers.SGD(0.02, momentum=0.9), keys)
    assert int(result["iteration"]) == 12
    for k in keys:
        # The Keras optimizer's own (constant) rate goes inside its momentum.
        np.testing.assert_allclose(
            np.asarray(result[slot(k, "momentum")]), -0.02 * np.asarray(trace[k]), rtol=1e-6
        )


def test_keras_sgd_momentum_to_optax_sgd_with_a_constant_rate():
    keys = variable_keys(layer_variables("old"))
    saved = keras.optimizers.SGD(0.1, momentum=0.9)
    state = keras_state(as_adapter(saved, layer_variables("old")), keys, 4, ("momentum",))
    result, _ = migrate(saved, state, optax.sgd(0.1, momentum=0.9), keys)
    for k in keys:
        np.testing.assert_allclose(
            np.asarray(find(result, "trace")[k]),
            -np.asarray(state[slot(k, "momentum")]) / 0.1,
            rtol=1e-6,
        )


def test_keras_sgd_with_a_schedule_divides_by_the_rate_at_the_saved_iteration():
    keys = variable_keys(layer_variables("old"))
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)
    saved = keras.optimizers.SGD(schedule, momentum=0.9)
    state = keras_state(as_adapter(saved, layer_variables("old")), keys, 10, ("momentum",))
    target = optax.sgd(optax.exponential_decay(0.1, 10, 0.5), momentum=0.9)
    result, _ = migrate(saved, state, target, keys)
    rate = 0.1 * 0.5 ** (10 / 10)  # the schedule at iteration 10
    for k in keys:
        np.testing.assert_allclose(
            np.asarray(find(result, "trace")[k]),
            -np.asarray(state[slot(k, "momentum")]) / rate,
            rtol=1e-5,
        )


@pytest.mark.parametrize("direction", ["keras_to_optax", "optax_to_keras"])
def test_sgd_momentum_on_one_side_only_does_not_migrate(direction):
    keys = variable_keys(layer_variables("old"))
    if direction == "keras_to_optax":
        saved = keras.optimizers.SGD(0.1, momentum=0.9)
        state = keras_state(as_adapter(saved, layer_variables("old")), keys, 2, ("momentum",))
        result, _ = migrate(saved, state, optax.sgd(optax.constant_schedule(0.1)), keys)
    else:
        tx = optax.sgd(0.1, momentum=0.9)
        result, _ = migrate(tx, tx.init(params_for(keys)), keras.optimizers.SGD(0.1), keys)
    assert result is None


def test_sgd_without_momentum_has_nothing_to_carry():
    keys = variable_keys(layer_variables("old"))
    saved = keras.optimizers.SGD(0.1)
    state = keras_state(as_adapter(saved, layer_variables("old")), keys, 2, ())
    assert migrate(saved, state, optax.sgd(0.1), keys)[0] is None
    tx = optax.sgd(0.1)
    assert migrate(tx, tx.init(params_for(keys)), keras.optimizers.SGD(0.1), keys)[0] is None


# --------------------------------------------------------------------------- no translation


@pytest.mark.parametrize(
    ("saved", "current"),
    [
        (lambda: keras.optimizers.Adam(1e-3), lambda: optax.adamw(1e-3)),  # other algorithms
        (lambda: keras.optimizers.AdamW(1e-3), lambda: optax.adam(1e-3)),
        (lambda: keras.optimizers.Adam(1e-3), lambda: optax.sgd(1e-3, momentum=0.9)),
        (lambda: keras.optimizers.Adam(1e-3), lambda: keras.optimizers.Adam(1e-3)),  # one family
        (lambda: keras.optimizers.Adam(1e-3, amsgrad=True), lambda: optax.adam(1e-3)),
        (lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
         lambda: optax.sgd(0.1, momentum=0.9, nesterov=True)),
    ],
    ids=["adam-adamw", "adamw-adam", "adam-sgd", "same-family", "amsgrad", "nesterov"],
)  # fmt: skip
def test_no_translation_returns_none(saved, current):
    saved = saved()
    keys = variable_keys(layer_variables("old"))
    slots = ("momentum",) if isinstance(saved, keras.optimizers.SGD) else ("momentum", "velocity")
    if getattr(saved, "amsgrad", False):
        slots = (*slots, "velocity_hat")
    state = keras_state(as_adapter(saved, layer_variables("old")), keys, 2, slots)
    assert migrate(saved, state, current(), keys)[0] is None


def test_optax_to_optax_is_the_same_family():
    keys = variable_keys(layer_variables("old"))
    tx = optax.adam(1e-3)
    assert migrate(tx, tx.init(params_for(keys)), optax.adam(1e-3), keys)[0] is None


def test_optax_amsgrad_to_keras_amsgrad_returns_none():
    keys = variable_keys(layer_variables("old"))
    tx = optax.amsgrad(1e-3)
    current = keras.optimizers.Adam(1e-3, amsgrad=True)
    assert migrate(tx, tx.init(params_for(keys)), current, keys)[0] is None
