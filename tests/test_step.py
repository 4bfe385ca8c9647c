"""Unit tests for ``kithara_ops.step``: the loss, micro-batching and the pure train/eval steps."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kithara_ops._backend import seed_keras
from kithara_ops.optim import as_adapter
from kithara_ops.state import TrainState, variable_keys
from kithara_ops.step import StepBuilder, masked_cross_entropy, split_micro_batches

VOCAB, DIM, SEQ = 11, 4, 5

# --------------------------------------------------------------------------- helpers


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def np_masked_ce(logits, targets, mask) -> tuple[float, float]:
    logp = np_log_softmax(np.asarray(logits))
    picked = np.take_along_axis(logp, np.asarray(targets)[..., None], axis=-1)[..., 0]
    mask = np.asarray(mask, np.float64)
    return float(-(picked * mask).sum()), float(mask.sum())


def tiny_model(seed: int = 0, dropout: float | None = None) -> keras.Model:
    seed_keras(seed)
    layers = [keras.Input((SEQ,), dtype="int32"), keras.layers.Embedding(VOCAB, DIM)]
    if dropout is not None:
        layers.append(keras.layers.Dropout(dropout))
    layers.append(keras.layers.Dense(VOCAB))
    model = keras.Sequential(layers)
    # Perturb the bias so that it is not zero and its gradient path is exercised.
    bias = model.trainable_variables[2]
    bias.assign(np.linspace(-0.3, 0.3, VOCAB).astype(np.float32))
    return model


def make_batch(rows: int, seed: int = 0, mask: str = "zeros") -> dict[str, jnp.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, VOCAB, (rows, SEQ), dtype=np.int32)
    y = rng.integers(0, VOCAB, (rows, SEQ), dtype=np.int32)
    if mask == "ones":
        m = np.ones((rows, SEQ), np.float32)
    else:
        # Uneven zeros: some rows fully masked, others partially, so micro-batches and
        # devices count different numbers of tokens.
        m = (rng.random((rows, SEQ)) > 0.4).astype(np.float32)
        m[0] = 0.0
        m[-1] = 1.0
    return {"x": jnp.asarray(x), "y": jnp.asarray(y), "mask": jnp.asarray(m)}


def reference_loss(params_list, batch) -> jnp.ndarray:
    """Mean masked cross entropy of Embedding -> Dense written out in jnp."""
    emb, kernel, bias = params_list
    logits = emb[batch["x"]] @ kernel + bias
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, batch["y"][..., None], axis=-1)[..., 0]
    mask = batch["mask"]
    return -(picked * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def make_state(model: keras.Model, adapter, seed: int = 0) -> tuple[TrainState, list, list]:
    param_keys = variable_keys(model.trainable_variables)
    nt_keys = variable_keys(model.non_trainable_variables)
    params = {k: jnp.array(v.value) for k, v in zip(param_keys, model.trainable_variables)}
    nt = {k: jnp.array(v.value) for k, v in zip(nt_keys, model.non_trainable_variables)}
    state = TrainState(
        step=jnp.int32(0),
        params=params,
        non_trainable=nt,
        opt_state=adapter.init(params),
        rng=jax.random.PRNGKey(seed),
    )
    return state, param_keys, nt_keys


def setup(lr: float = 0.1, dropout: float | None = None):
    """A state and a factory of step builders, all for the same model and adapter."""
    model = tiny_model(dropout=dropout)
    adapter = as_adapter(optax.sgd(lr), model.trainable_variables)
    state, param_keys, nt_keys = make_state(model, adapter)

    def builder(grad_accum_steps: int = 1, sharding=None) -> StepBuilder:
        return StepBuilder(model, adapter, param_keys, nt_keys, grad_accum_steps, sharding)

    return builder, state, param_keys


def builder_and_state(lr: float = 0.1, grad_accum_steps: int = 1, dropout=None):
    make, state, keys = setup(lr, dropout)
    return make(grad_accum_steps), state, keys


# --------------------------------------------------------------------------- masked_cross_entropy


@pytest.mark.parametrize("mask_kind", ["ones", "zeros", "float"])
def test_masked_cross_entropy_matches_numpy_log_softmax(mask_kind):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 4, 6)).astype(np.float32) * 3
    targets = rng.integers(0, 6, (3, 4)).astype(np.int32)
    if mask_kind == "ones":
        mask = np.ones((3, 4), np.float32)
    elif mask_kind == "zeros":
        mask = np.array([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 1]], np.float32)
    else:
        mask = rng.uniform(0.1, 2.0, (3, 4)).astype(np.float32)
    loss_sum, count = masked_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), mask)
    want_sum, want_count = np_masked_ce(logits, targets, mask)
    np.testing.assert_allclose(float(loss_sum), want_sum, rtol=1e-5)
    np.testing.assert_allclose(float(count), want_count, rtol=1e-6)
    assert loss_sum.shape == () and count.shape == ()


def test_masked_cross_entropy_ignores_masked_tokens_entirely():
    logits = np.zeros((1, 3, 4), np.float32)
    logits[0, 1] = [1e4, -1e4, 0, 0]  # an extreme row that must not count when masked
    targets = np.array([[0, 1, 2]], np.int32)
    mask = np.array([[1, 0, 1]], np.float32)
    loss_sum, count = masked_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), mask)
    # Two uniform rows over 4 classes: each costs log(4).
    np.testing.assert_allclose(float(loss_sum), 2 * np.log(4), rtol=1e-6)
    assert float(count) == 2.0


def test_masked_cross_entropy_computes_in_float32_for_bfloat16_logits():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    targets = rng.integers(0, 5, (2, 3)).astype(np.int32)
    mask = np.ones((2, 3), np.int32)  # an integer mask is accepted too
    loss_sum, count = masked_cross_entropy(jnp.asarray(logits, jnp.bfloat16), targets, mask)
    assert loss_sum.dtype == jnp.float32 and count.dtype == jnp.float32
    rounded = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    want_sum, _ = np_masked_ce(rounded, targets, mask)
    np.testing.assert_allclose(float(loss_sum), want_sum, rtol=1e-5)
    assert float(count) == 6.0


# --------------------------------------------------------------------------- split_micro_batches


def test_split_micro_batches_takes_strided_rows():
    batch = {
        "x": np.arange(12 * 3).reshape(12, 3),
        "mask": np.arange(12, dtype=np.float32),
    }
    out = split_micro_batches(batch, 3)
    assert out["x"].shape == (3, 4, 3)
    assert out["mask"].shape == (3, 4)
    for i in range(3):
        rows = [i, i + 3, i + 6, i + 9]
        np.testing.assert_array_equal(np.asarray(out["x"][i]), batch["x"][rows])
        np.testing.assert_array_equal(np.asarray(out["mask"][i]), np.array(rows, np.float32))


def test_split_micro_batches_into_one_is_the_batch_with_a_leading_axis():
    x = np.arange(8).reshape(4, 2)
    out = split_micro_batches({"x": x}, 1)
    np.testing.assert_array_equal(np.asarray(out["x"]), x[None])


def test_split_micro_batches_every_row_once():
    x = np.arange(16)
    out = np.asarray(split_micro_batches({"x": x}, 4)["x"])
    assert sorted(out.ravel().tolist()) == list(range(16))
    # Micro-batch i holds exactly the rows congruent to i mod 4.
    assert all((out[i] % 4 == i).all() for i in range(4))


# --------------------------------------------------------------------------- train_step


def test_train_step_is_one_sgd_step_on_the_independent_gradient():
    builder, state, keys = builder_and_state(lr=0.1)
    batch = make_batch(4, seed=3)
    before = [np.asarray(state.params[k]) for k in keys]
    loss, grads = jax.value_and_grad(reference_loss)([jnp.asarray(p) for p in before], batch)

    new_state, metrics = jax.jit(builder.train_step)(state, batch)

    for key, p, g in zip(keys, before, grads):
        assert np.abs(np.asarray(g)).max() > 1e-4, key  # the check below must mean something
        np.testing.assert_allclose(
            np.asarray(new_state.params[key]), p - 0.1 * np.asarray(g), atol=1e-6, err_msg=key
        )
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
    grad_norm = np.sqrt(sum(float((np.asarray(g, np.float64) ** 2).sum()) for g in grads))
    np.testing.assert_allclose(float(metrics["grad_norm"]), grad_norm, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["learning_rate"]), 0.1, rtol=1e-7)
    assert float(metrics["tokens"]) == float(np.asarray(batch["mask"]).sum())
    assert bool(metrics["finite"])
    assert set(metrics) == {
        "loss", "grad_norm", "update_norm", "param_norm", "learning_rate", "tokens", "finite"
    }  # fmt: skip


def test_train_step_gradient_agrees_with_finite_differences():
    builder, state, keys = builder_and_state(lr=1.0)
    batch = make_batch(2, seed=4, mask="ones")
    new_state, _ = jax.jit(builder.train_step)(state, batch)
    # With lr=1 the step is params - grad, so the gradient is the parameter change.
    bias_key = keys[2]
    grad = np.asarray(state.params[bias_key]) - np.asarray(new_state.params[bias_key])

    params64 = [np.asarray(state.params[k], np.float64) for k in keys]
    x, y = np.asarray(batch["x"]), np.asarray(batch["y"])

    def loss(bias):
        logits = params64[0][x] @ params64[1] + bias
        return np_masked_ce(logits, y, np.ones_like(x))[0] / x.size

    eps = 1e-5
    for j in range(VOCAB):
        e = np.zeros(VOCAB)
        e[j] = eps
        fd = (loss(params64[2] + e) - loss(params64[2] - e)) / (2 * eps)
        np.testing.assert_allclose(grad[j], fd, atol=1e-5)


def test_train_step_without_mask_counts_every_token():
    builder, state, keys = builder_and_state()
    batch = make_batch(2, seed=5)
    unmasked = {"x": batch["x"], "y": batch["y"]}
    ones = {**unmasked, "mask": jnp.ones_like(batch["mask"])}
    step = jax.jit(builder.train_step)
    s1, m1 = step(state, unmasked)
    s2, m2 = step(state, ones)
    assert float(m1["tokens"]) == 2 * SEQ
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    for k in keys:
        np.testing.assert_allclose(np.asarray(s1.params[k]), np.asarray(s2.params[k]), atol=1e-7)


def test_train_step_all_masked_batch_takes_no_step():
    builder, state, keys = builder_and_state()
    batch = make_batch(2, seed=6)
    batch["mask"] = jnp.zeros_like(batch["mask"])
    new_state, metrics = jax.jit(builder.train_step)(state, batch)
    # The count is clamped to 1 for the division, so loss and gradients are zero, not NaN.
    assert float(metrics["tokens"]) == 0.0
    assert float(metrics["loss"]) == 0.0 and float(metrics["grad_norm"]) == 0.0
    for k in keys:
        np.testing.assert_array_equal(np.asarray(new_state.params[k]), state.params[k])


def test_train_step_increments_step_and_changes_rng_each_step():
    builder, state, _ = builder_and_state()
    batch = make_batch(2, seed=7)
    step = jax.jit(builder.train_step)
    s1, _ = step(state, batch)
    s2, _ = step(s1, batch)
    assert int(s1.step) == 1 and int(s2.step) == 2
    assert s2.step.dtype == state.step.dtype
    keys = [np.asarray(s.rng) for s in (state, s1, s2)]
    assert not np.array_equal(keys[0], keys[1])
    assert not np.array_equal(keys[1], keys[2])
    assert not np.array_equal(keys[0], keys[2])
    # The same state gives the same next key: the step is a pure function of its inputs.
    again, _ = step(state, batch)
    np.testing.assert_array_equal(np.asarray(again.rng), np.asarray(s1.rng))


def test_train_step_refreshes_dropout_seeds_from_the_state_rng():
    builder, state, _ = builder_and_state(dropout=0.5)
    (seed_key,) = builder.seed_keys
    assert seed_key.endswith("seed_generator_state")
    batch = make_batch(4, seed=8, mask="ones")
    step = jax.jit(builder.train_step)
    s1, m1 = step(state, batch)
    s2, _ = step(s1, batch)
    seeds = [np.asarray(s.non_trainable[seed_key]) for s in (state, s1, s2)]
    assert seeds[1].dtype == seeds[0].dtype
    assert not np.array_equal(seeds[0], seeds[1]) and not np.array_equal(seeds[1], seeds[2])

    # Same rng -> same dropout -> same loss; another rng -> other dropout masks.
    again, m_again = step(state, batch)
    np.testing.assert_array_equal(np.asarray(again.non_trainable[seed_key]), seeds[1])
    assert float(m_again["loss"]) == float(m1["loss"])
    other = dataclasses.replace(state, rng=jax.random.PRNGKey(123))
    _, m_other = step(other, batch)
    assert float(m_other["loss"]) != float(m1["loss"])


def test_gradient_accumulation_two_micro_batches_equal_one_step():
    batch = make_batch(8, seed=9)  # uneven mask zeros over the micro-batches
    make, state, keys = setup()
    one, two = make(1), make(2)
    s1, m1 = jax.jit(one.train_step)(state, batch)
    s2, m2 = jax.jit(two.train_step)(state, batch)
    for k in keys:
        assert not np.allclose(np.asarray(s1.params[k]), np.asarray(state.params[k]))
        np.testing.assert_allclose(np.asarray(s2.params[k]), np.asarray(s1.params[k]), atol=1e-6)
    for name in ("loss", "grad_norm", "tokens", "learning_rate"):
        np.testing.assert_allclose(float(m2[name]), float(m1[name]), rtol=1e-6, err_msg=name)


def test_gradient_accumulation_weights_tokens_not_micro_batches():
    # Rows 0,2 (micro-batch 0) keep one token each, rows 1,3 (micro-batch 1) keep all:
    # averaging per-micro-batch means would weight the two halves equally and differ.
    batch = make_batch(4, seed=10, mask="ones")
    mask = np.ones((4, SEQ), np.float32)
    mask[[0, 2], 1:] = 0.0
    batch["mask"] = jnp.asarray(mask)
    two, state, keys = builder_and_state(grad_accum_steps=2)
    new_state, metrics = jax.jit(two.train_step)(state, batch)
    before = [state.params[k] for k in keys]
    loss, grads = jax.value_and_grad(reference_loss)(before, batch)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
    assert float(metrics["tokens"]) == mask.sum()
    for k, p, g in zip(keys, before, grads):
        np.testing.assert_allclose(
            np.asarray(new_state.params[k]), np.asarray(p) - 0.1 * np.asarray(g), atol=1e-6
        )


def test_gradient_accumulation_with_micro_batch_sharding_on_eight_devices(eight_devices):
    mesh = Mesh(np.asarray(eight_devices).reshape(8, 1), ("data", "fsdp"))
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    replicated = NamedSharding(mesh, PartitionSpec())
    # A micro-batch (after the leading micro-batch axis) is split over all 8 devices.
    micro = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    make, state, keys = setup()
    one, two = make(1), make(2, micro)
    batch = make_batch(16, seed=11)
    placed_batch = jax.device_put(batch, batch_sharding)
    placed_state = jax.device_put(state, replicated)
    s2, m2 = jax.jit(two.train_step)(placed_state, placed_batch)
    s1, m1 = jax.jit(one.train_step)(state, batch)
    for k in keys:
        np.testing.assert_allclose(np.asarray(s2.params[k]), np.asarray(s1.params[k]), atol=1e-6)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-6)
    assert float(m2["tokens"]) == float(m1["tokens"])


def test_train_step_with_a_keras_optimizer_follows_the_same_rule():
    model = tiny_model()
    adapter = as_adapter(keras.optimizers.SGD(0.05), model.trainable_variables)
    state, keys, nt_keys = make_state(model, adapter)
    builder = StepBuilder(model, adapter, keys, nt_keys)
    batch = make_batch(4, seed=12)
    before = [state.params[k] for k in keys]
    _, grads = jax.value_and_grad(reference_loss)(before, batch)
    new_state, metrics = jax.jit(builder.train_step)(state, batch)
    for k, p, g in zip(keys, before, grads):
        np.testing.assert_allclose(
            np.asarray(new_state.params[k]), np.asarray(p) - 0.05 * np.asarray(g), atol=1e-6
        )
    np.testing.assert_allclose(float(metrics["learning_rate"]), 0.05, rtol=1e-6)
    iteration = next(v for k, v in new_state.opt_state.items() if k.endswith("iteration"))
    assert int(iteration) == 1


def _one_keras_step(optimizer, grad_accum_steps: int = 1, skip_nonfinite: bool = False):
    model = tiny_model()
    adapter = as_adapter(optimizer, model.trainable_variables)
    state, keys, nt_keys = make_state(model, adapter)
    builder = StepBuilder(
        model, adapter, keys, nt_keys, grad_accum_steps, skip_nonfinite=skip_nonfinite
    )
    new_state, metrics = jax.jit(builder.train_step)(state, make_batch(4, seed=12))
    params = [np.asarray(new_state.params[k]) for k in keys]  # keys differ per model
    return [np.asarray(state.params[k]) for k in keys], params, new_state, metrics


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize(
    "scaled",
    [
        lambda: keras.optimizers.SGD(0.05, loss_scale_factor=128),
        lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05)),
    ],
    ids=["loss_scale_factor", "LossScaleOptimizer"],
)
def test_a_loss_scaled_keras_optimizer_steps_exactly_as_the_plain_one(scaled, accum):
    """The optimizer divides the gradients by its scale: the step must scale the loss."""
    _, plain, _, plain_metrics = _one_keras_step(keras.optimizers.SGD(0.05), accum)
    _, params, _, metrics = _one_keras_step(scaled(), accum)
    for new, expected in zip(params, plain):
        np.testing.assert_array_equal(new, expected)
    assert float(metrics["grad_norm"]) == float(plain_metrics["grad_norm"])
    assert float(metrics["loss"]) == float(plain_metrics["loss"])


def test_an_overflowing_dynamic_loss_scale_skips_the_step_and_halves_the_scale():
    """Keras' LossScaleOptimizer skips a step whose scaled gradient overflowed and halves its
    scale: that step counts as finite, and skip_nonfinite keeps the halved scale."""
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05), 2.0**127)
    before, after, new_state, metrics = _one_keras_step(optimizer, skip_nonfinite=True)
    for new, old in zip(after, before):
        np.testing.assert_array_equal(new, old)
    scale = next(v for k, v in new_state.opt_state.items() if k.endswith("dynamic_scale"))
    assert float(scale) == 2.0**126
    assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))


# --------------------------------------------------------------------------- eval_step


def test_eval_step_returns_loss_sum_and_count():
    builder, state, keys = builder_and_state()
    batch = make_batch(3, seed=13)
    loss_sum, count = jax.jit(builder.eval_step)(
        state.params, state.opt_state, state.non_trainable, batch
    )
    p = [np.asarray(state.params[k], np.float64) for k in keys]
    logits = p[0][np.asarray(batch["x"])] @ p[1] + p[2]
    want_sum, want_count = np_masked_ce(logits, batch["y"], batch["mask"])
    np.testing.assert_allclose(float(loss_sum), want_sum, rtol=1e-5)
    assert float(count) == want_count
    # A sum, not a mean: doubling the batch doubles both.
    doubled = {k: jnp.concatenate([v, v]) for k, v in batch.items()}
    s2, c2 = jax.jit(builder.eval_step)(state.params, state.opt_state, state.non_trainable, doubled)
    np.testing.assert_allclose(float(s2), 2 * want_sum, rtol=1e-5)
    assert float(c2) == 2 * want_count


def test_eval_step_runs_the_model_in_inference_mode():
    # With dropout at 0.9, training-mode outputs would vary with the seed; eval must not.
    builder, state, keys = builder_and_state(dropout=0.9)
    batch = make_batch(2, seed=14)
    changed = dict(state.non_trainable)
    (seed_key,) = builder.seed_keys
    changed[seed_key] = changed[seed_key] + jnp.uint32(17)
    a = jax.jit(builder.eval_step)(state.params, state.opt_state, state.non_trainable, batch)
    b = jax.jit(builder.eval_step)(state.params, state.opt_state, changed, batch)
    assert float(a[0]) == float(b[0])
    p = [np.asarray(state.params[k], np.float64) for k in keys]
    logits = p[0][np.asarray(batch["x"])] @ p[1] + p[2]
    np.testing.assert_allclose(
        float(a[0]), np_masked_ce(logits, batch["y"], batch["mask"])[0], rtol=1e-5
    )
