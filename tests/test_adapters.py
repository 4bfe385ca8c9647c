"""Unit tests for the optimizer adapters (``kithara_ops.optim``): both families, one protocol."""

from __future__ import annotations

import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kithara_ops._backend import seed_keras
from kithara_ops.errors import ConfigError
from kithara_ops.optim import as_adapter
from kithara_ops.state import variable_keys

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "kithara_ops"
# Named explicitly: Keras numbers default names per session, and the keys follow the names.
EMBEDDINGS = "tiny/emb/embeddings"
KERNEL = "tiny/out/kernel"
BIAS = "tiny/out/bias"

# --------------------------------------------------------------------------- helpers


def tiny_model() -> keras.Model:
    seed_keras(0)
    model = keras.Sequential(
        [keras.layers.Embedding(16, 4, name="emb"), keras.layers.Dense(16, name="out")],
        name="tiny",
    )
    model.build((None, 3))
    return model


@pytest.fixture
def model() -> keras.Model:
    return tiny_model()


def params_of(model: keras.Model) -> dict[str, jax.Array]:
    variables = model.trainable_variables
    return {k: jnp.asarray(v.value) for k, v in zip(variable_keys(variables), variables)}


def grads_like(params: dict[str, jax.Array], seed: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    return {
        k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in sorted(params.items())
    }


def to_numpy(tree) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def assert_close(actual: dict, expected: dict, **tolerance) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(np.asarray(actual[key]), expected[key], err_msg=key, **tolerance)


def step(adapter, params, grads, opt_state, loss=1.0):
    """One adapter step, jit-compiled as in the train step."""
    return jax.jit(adapter.update)(grads, opt_state, params, jnp.float32(loss))


def constant_minus(scale: float) -> optax.GradientTransformation:
    """A transformation of our own making: ``-scale * g``, with no learning rate to find."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda g: -scale * g, updates), state

    return optax.GradientTransformation(init, update)


# --------------------------------------------------------------------------- as_adapter


def test_as_adapter_picks_the_family(model):
    variables = model.trainable_variables
    keras_opt = keras.optimizers.Adam(1e-3)
    adapter = as_adapter(keras_opt, variables)
    assert (adapter.family, adapter.init_on_host) == ("keras", True)
    assert adapter.optimizer is keras_opt  # not built yet: the user's object is used as is

    tx = optax.adamw(1e-3)
    adapter = as_adapter(tx, variables)
    assert (adapter.family, adapter.init_on_host) == ("optax", False)
    assert adapter.optimizer is tx

    multi = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2)
    adapter = as_adapter(multi, variables)
    assert adapter.family == "optax"
    assert adapter.optimizer is multi


class NotAnOptimizer:
    pass


@pytest.mark.parametrize(
    ("obj", "named"),
    [
        (NotAnOptimizer(), "NotAnOptimizer"),
        ("adam", "builtins.str"),
        (optax.adam, "builtins.function"),  # the factory, not a transformation
    ],
)
def test_as_adapter_refuses_other_objects_naming_the_type(model, obj, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        as_adapter(obj, model.trainable_variables)


def test_a_built_keras_optimizer_is_copied_not_mutated(model):
    user_opt = keras.optimizers.Adam(3e-3, beta_1=0.8)
    user_opt.build([keras.Variable(np.ones((2,), np.float32))])
    before = [(v.path, np.asarray(v.value).copy()) for v in user_opt.variables]

    adapter = as_adapter(user_opt, model.trainable_variables)
    params = params_of(model)
    step(adapter, params, grads_like(params, 0), adapter.init(params))

    assert adapter.optimizer is not user_opt
    assert type(adapter.optimizer) is type(user_opt)
    assert adapter.optimizer.get_config() == user_opt.get_config()
    after = [(v.path, np.asarray(v.value)) for v in user_opt.variables]
    assert [p for p, _ in after] == [p for p, _ in before]
    for (path, old), (_, new) in zip(before, after):
        np.testing.assert_array_equal(new, old, err_msg=path)


# --------------------------------------------------------------------------- update


def test_optax_update_is_optax_own_maths(model):
    tx = optax.adam(1e-2)
    adapter = as_adapter(tx, model.trainable_variables)
    params = params_of(model)
    state = adapter.init(params)
    ref_params, ref_state = params, tx.init(params)
    for seed in range(2):
        grads = grads_like(params, seed)
        params, state, _ = step(adapter, params, grads, state)
        updates, ref_state = tx.update(grads, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)
    assert_close(params, to_numpy(ref_params), rtol=1e-6, atol=1e-7)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)


def test_optax_update_passes_the_loss_to_transforms_that_take_it(model):
    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, value, **extra):
        del params, extra
        return jax.tree.map(lambda g: -value * g, updates), state

    adapter = as_adapter(optax.GradientTransformationExtraArgs(init, update), [])
    params = params_of(model)
    grads = grads_like(params, 0)
    new_params, _, _ = step(adapter, params, grads, adapter.init(params), loss=0.25)
    expected = {k: np.asarray(params[k]) - 0.25 * np.asarray(grads[k]) for k in params}
    assert_close(new_params, expected, rtol=1e-6, atol=1e-7)


def test_keras_sgd_update_is_params_minus_lr_times_grads(model):
    adapter = as_adapter(keras.optimizers.SGD(0.1), model.trainable_variables)
    params = params_of(model)
    grads = grads_like(params, 0)
    new_params, new_state, lr = step(adapter, params, grads, adapter.init(params))
    expected = {k: to_numpy(params)[k] - 0.1 * to_numpy(grads)[k] for k in params}
    assert_close(new_params, expected, rtol=1e-6, atol=1e-7)
    assert int(new_state["iteration"]) == 1
    assert float(lr) == pytest.approx(0.1)


def test_keras_adam_update_matches_a_numpy_adam(model):
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-7  # Keras' Adam defaults besides the rate
    adapter = as_adapter(keras.optimizers.Adam(lr), model.trainable_variables)
    params = params_of(model)
    state = adapter.init(params)

    ref = to_numpy(params)
    m = {k: np.zeros_like(v) for k, v in ref.items()}
    v = {k: np.zeros_like(x) for k, x in ref.items()}
    # Two steps with different gradients, so the bias correction's t is checked too.
    for t, seed in enumerate((0, 1), start=1):
        grads = grads_like(params, seed)
        params, state, used = step(adapter, params, grads, state)
        alpha = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        for k, g in to_numpy(grads).items():
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            ref[k] = ref[k] - alpha * m[k] / (np.sqrt(v[k]) + eps)
        assert int(state["iteration"]) == t
        assert float(used) == pytest.approx(lr)
    assert_close(params, ref, rtol=1e-5, atol=1e-6)
    slot = "tiny_out_kernel_momentum"
    np.testing.assert_allclose(np.asarray(state[slot]), m[KERNEL], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- learning rate used


def test_learning_rate_used_for_a_constant_rate(model):
    params = params_of(model)
    grads = grads_like(params, 0)
    for optimizer in (keras.optimizers.Adam(3e-3), optax.adam(3e-3)):
        adapter = as_adapter(optimizer, model.trainable_variables)
        _, _, lr = step(adapter, params, grads, adapter.init(params))
        assert float(lr) == pytest.approx(3e-3), adapter.family


def test_keras_schedule_is_read_at_the_pre_step_iteration(model):
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    adapter = as_adapter(keras.optimizers.SGD(schedule), model.trainable_variables)
    params = params_of(model)
    grads = grads_like(params, 0)
    state = dict(adapter.init(params), iteration=jnp.asarray(3, jnp.int32))
    new_params, new_state, lr = step(adapter, params, grads, state)
    expected_lr = 0.1 * 0.5**3  # iteration 3, before it is incremented
    assert float(lr) == pytest.approx(expected_lr)
    assert int(new_state["iteration"]) == 4
    # The reported rate is the one the step applied.
    expected = {k: to_numpy(params)[k] - expected_lr * to_numpy(grads)[k] for k in params}
    assert_close(new_params, expected, rtol=1e-6, atol=1e-7)


def test_optax_schedule_is_evaluated_at_the_count(model):
    schedule = optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.5)
    adapter = as_adapter(optax.sgd(schedule), model.trainable_variables)
    params = params_of(model)
    state = adapter.init(params)
    for count in range(3):
        before = to_numpy(params)
        grads = grads_like(params, count)
        params, state, lr = step(adapter, params, grads, state)
        expected_lr = 0.1 * 0.5**count
        assert float(lr) == pytest.approx(expected_lr), count
        expected = {k: before[k] - expected_lr * to_numpy(grads)[k] for k in before}
        assert_close(params, expected, rtol=1e-6, atol=1e-7)


def test_optax_injected_learning_rate_is_reported(model):
    params = params_of(model)
    grads = grads_like(params, 0)
    adapter = as_adapter(optax.inject_hyperparams(optax.adam)(learning_rate=0.05), [])
    _, _, lr = step(adapter, params, grads, adapter.init(params))
    assert float(lr) == pytest.approx(0.05)

    # An injected schedule reports the value this step used, not the next one.
    schedule = optax.linear_schedule(0.1, 0.0, transition_steps=10)
    adapter = as_adapter(optax.inject_hyperparams(optax.sgd)(learning_rate=schedule), [])
    state = adapter.init(params)
    for count in range(2):
        params, state, lr = step(adapter, params, grads, state)
        assert float(lr) == pytest.approx(float(schedule(count))), count


def test_custom_optax_transformation_reports_nan(model):
    adapter = as_adapter(constant_minus(0.1), model.trainable_variables)
    params = params_of(model)
    grads = grads_like(params, 0)
    new_params, _, lr = step(adapter, params, grads, adapter.init(params))
    assert math.isnan(float(lr))
    # Still applied: only the rate is unknown.
    expected = {k: to_numpy(params)[k] - 0.1 * to_numpy(grads)[k] for k in params}
    assert_close(new_params, expected, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- state_shardings


def param_shardings(devices, params):
    mesh = Mesh(np.asarray(devices[:8]), ("model",))
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = {k: replicated for k in params}
    # 16 embedding rows split 2 per device.
    shardings[EMBEDDINGS] = NamedSharding(mesh, PartitionSpec("model", None))
    return shardings, replicated


def abstract(params):
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in params.items()}


def test_optax_state_shardings_follow_their_parameter(model, eight_devices):
    adapter = as_adapter(optax.adam(1e-2), model.trainable_variables)
    params = params_of(model)
    shardings, replicated = param_shardings(eight_devices, params)
    abstract_state = jax.eval_shape(adapter.init, abstract(params))

    placed = adapter.state_shardings(abstract_state, shardings, replicated)

    adam_state = placed[0]
    assert adam_state.count == replicated
    for moments in (adam_state.mu, adam_state.nu):
        assert moments == shardings
    # The shardings fit the real state: placing it shards the embedding slots for real.
    state = jax.device_put(adapter.init(params), placed)
    assert state[0].mu[EMBEDDINGS].addressable_shards[0].data.shape == (2, 4)


def test_keras_state_shardings_follow_their_parameter(model, eight_devices):
    adapter = as_adapter(keras.optimizers.Adam(1e-2), model.trainable_variables)
    params = params_of(model)
    shardings, replicated = param_shardings(eight_devices, params)
    abstract_state = jax.eval_shape(adapter.init, abstract(params))

    placed = adapter.state_shardings(abstract_state, shardings, replicated)

    assert placed.keys() == abstract_state.keys()
    assert placed["iteration"] == replicated
    assert placed["learning_rate"] == replicated
    for key, param in (
        ("tiny_emb_embeddings", EMBEDDINGS),
        ("tiny_out_kernel", KERNEL),
        ("tiny_out_bias", BIAS),
    ):
        for slot in ("momentum", "velocity"):
            assert placed[f"{key}_{slot}"] == shardings[param], (key, slot)
    state = jax.device_put(adapter.init(params), placed)
    assert state["tiny_emb_embeddings_velocity"].addressable_shards[0].data.shape == (2, 4)


# --------------------------------------------------------------------------- state_keys, variables


def test_keras_state_keys_leave_out_the_session_optimizer_name(model):
    first = as_adapter(keras.optimizers.Adam(), model.trainable_variables)
    second = as_adapter(keras.optimizers.Adam(), model.trainable_variables)
    # Keras numbers names within a session, so the two differ while their keys must not.
    assert first.optimizer.name != second.optimizer.name
    assert first.state_keys == second.state_keys
    assert first.state_keys[:2] == ["iteration", "learning_rate"]
    assert not any(k.startswith(first.optimizer.name) for k in first.state_keys)
    # The keys are those of the state dict, in the same order.
    assert list(first.init(params_of(model))) == first.state_keys


def test_optax_state_keys_are_none(model):
    assert as_adapter(optax.adam(1e-3), model.trainable_variables).state_keys is None


def test_variables(model):
    adapter = as_adapter(keras.optimizers.Adam(), model.trainable_variables)
    assert [id(v) for v in adapter.variables] == [id(v) for v in adapter.optimizer.variables]
    assert len(adapter.variables) == len(adapter.state_keys)

    assert len(as_adapter(optax.adam(1e-3), model.trainable_variables).variables) == 0


# --------------------------------------------------------------------------- write_back


def test_keras_write_back_copies_the_state_into_the_optimizer(model):
    adapter = as_adapter(keras.optimizers.Adam(1e-2), model.trainable_variables)
    params = params_of(model)
    state = adapter.init(params)
    for seed in range(3):
        params, state, _ = step(adapter, params, grads_like(params, seed), state)
    slot = "tiny_out_kernel_velocity"
    assert int(adapter.optimizer.iterations.value) == 0  # the steps were stateless

    adapter.write_back(state)

    assert int(adapter.optimizer.iterations.value) == 3
    (variable,) = [v for v in adapter.variables if v.path.endswith("/" + slot)]
    np.testing.assert_array_equal(np.asarray(variable.value), np.asarray(state[slot]))
    assert np.any(np.asarray(variable.value) != 0)


def test_optax_write_back_is_a_no_op(model):
    tx = optax.adam(1e-2)
    adapter = as_adapter(tx, model.trainable_variables)
    params = params_of(model)
    _, state, _ = step(adapter, params, grads_like(params, 0), adapter.init(params))
    saved = [np.asarray(leaf).copy() for leaf in jax.tree.leaves(state)]

    assert adapter.write_back(state) is None

    assert adapter.optimizer is tx
    assert len(adapter.variables) == 0
    for old, new in zip(saved, jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(new), old)


# --------------------------------------------------------------------------- family stays inside


# Asking an adapter its family, or comparing against a family's name, in the Trainer would
# bring the per-family branching back that the adapters exist to keep out.
FAMILY_CHECKS = re.compile(r"\.family\b|\bfamily\s*[!=]=|[\"'](?:keras|optax)[\"']")


@pytest.mark.parametrize("module", ["trainer.py", "step.py"])
def test_the_trainer_never_asks_the_family(module):
    assert FAMILY_CHECKS.search('if adapter.family == "keras":')  # the pattern does catch it
    lines = (PACKAGE_DIR / module).read_text().splitlines()
    found = [f"{n}: {line}" for n, line in enumerate(lines, 1) if FAMILY_CHECKS.search(line)]
    assert not found, f"{module} branches on the optimizer family:\n" + "\n".join(found)
