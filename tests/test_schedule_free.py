"""Schedule-free optimizers: evaluation, write-back and export use the averaged parameters."""

from __future__ import annotations

import jax
import keras
import numpy as np
import optax
import pytest
from conftest import BATCH, SEQ_LEN

from kithara_ops import RunConfig, Trainer, data, feed
from kithara_ops.build import build_trainer
from kithara_ops.export import export
from kithara_ops.optim import as_adapter
from kithara_ops.step import StepBuilder


def eval_batches(documents):
    return data.load(documents[:20], seq_len=SEQ_LEN, batch_size=BATCH, shuffle=False, repeat=False)


def loss_at(trainer, params, documents) -> float:
    """The mean eval loss at exactly ``params``, over the Trainer's eval batches.

    Evaluated by a step of a plain optimizer (no averaging), so ``params`` is the point."""
    plain = as_adapter(optax.sgd(0.0), trainer.model.trainable_variables)
    keys = trainer.key_groups
    step = jax.jit(
        StepBuilder(trainer.model, plain, keys["params"], keys["non_trainable"]).eval_step
    )
    opt_state = plain.init(params)
    batches = feed.eval_batches(eval_batches(documents), trainer.batch_sharding, 1, 2)
    sums = [step(params, opt_state, trainer.state.non_trainable, b) for b in batches]
    return float(sum(s for s, _ in sums)) / float(sum(c for _, c in sums))


def trained(make_model, documents, stdlib_data, optimizer):
    trainer = Trainer(
        make_model(), optimizer, stdlib_data, eval_data=eval_batches(documents),
        steps=4, eval_steps=2, tracking=False, system_metrics=False,
    )  # fmt: skip
    return trainer, trainer.train()


def model_params(trainer):
    keys = trainer.key_groups["params"]
    return {k: np.asarray(v.value) for k, v in zip(keys, trainer.model.trainable_variables)}


def assert_same(a, b):
    for key in a:
        np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), rtol=1e-6, atol=1e-7)


def test_optax_eval_and_write_back_use_the_eval_params(make_model, stdlib_documents, stdlib_data):
    trainer, result = trained(
        make_model, stdlib_documents, stdlib_data, optax.contrib.schedule_free_adamw(1e-2)
    )
    state = trainer.state
    averaged = optax.contrib.schedule_free_eval_params(state.opt_state, state.params)
    by_hand = loss_at(trainer, averaged, stdlib_documents)
    raw = loss_at(trainer, state.params, stdlib_documents)
    assert result.eval_loss == pytest.approx(by_hand, rel=1e-6)
    assert abs(raw - by_hand) > 1e-3  # the raw iterate is another point
    assert_same(model_params(trainer), averaged)
    # The state keeps the gradient point y, not the average (resume continues from y).
    assert any(not np.allclose(state.params[k], averaged[k]) for k in state.params)


def test_keras_schedule_free_adamw_is_evaluated_at_its_average(
    make_model, stdlib_documents, stdlib_data
):
    trainer, result = trained(
        make_model, stdlib_documents, stdlib_data,
        keras.optimizers.ScheduleFreeAdamW(1e-2, beta_1=0.8),
    )  # fmt: skip
    state = trainer.state
    # x = (y - (1 - b1) z) / b1, with z each parameter's "momentum" slot (Keras names it
    # after the parameter's path).
    slots = {k: k.replace("/", "_") + "_momentum" for k in state.params}
    assert set(slots.values()) <= set(state.opt_state)
    averaged = {
        k: (np.asarray(y) - 0.2 * np.asarray(state.opt_state[slots[k]])) / 0.8
        for k, y in state.params.items()
    }
    assert result.eval_loss == pytest.approx(loss_at(trainer, averaged, stdlib_documents), 1e-5)
    assert abs(loss_at(trainer, state.params, stdlib_documents) - result.eval_loss) > 1e-3
    assert_same(model_params(trainer), averaged)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda: optax.inject_hyperparams(optax.contrib.schedule_free_adamw)(learning_rate=1e-2),
        lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.contrib.schedule_free_sgd(0.1)),
        lambda: optax.MultiSteps(optax.contrib.schedule_free_adamw(1e-2), every_k_schedule=1),
    ],
    ids=["inject_hyperparams", "chain", "MultiSteps"],
)
def test_a_wrapped_schedule_free_state_is_found(wrap):
    params = {"a": jax.numpy.arange(4.0), "b": jax.numpy.ones((2, 2))}
    adapter = as_adapter(wrap(), [])
    state = adapter.init(params)
    for i in range(3):
        grads = jax.tree.map(lambda p, i=i: jax.numpy.sin(p + i), params)
        params, state, _ = adapter.update(grads, state, params, jax.numpy.float32(1.0))
    (inner,) = [
        s
        for s in jax.tree.leaves(
            state, is_leaf=lambda x: isinstance(x, optax.contrib.ScheduleFreeState)
        )
        if isinstance(s, optax.contrib.ScheduleFreeState)
    ]
    expected = optax.contrib.schedule_free_eval_params(inner, params)
    got = adapter.eval_params(params, state)
    assert_same(got, expected)
    assert any(not np.allclose(got[k], params[k]) for k in params)


def test_other_optimizers_evaluate_their_parameters_as_they_are():
    params = {"a": jax.numpy.arange(4.0)}
    for optimizer in (optax.adam(1e-2), keras.optimizers.Adam(1e-2)):
        adapter = as_adapter(optimizer, [keras.Variable(np.arange(4.0), name="a")])
        assert adapter.eval_params(params, adapter.init(params)) is params


def test_an_export_holds_the_eval_params(tmp_path):
    directory = tmp_path / "ckpt"
    config = RunConfig(
        model="tiny", data="synthetic", seq_len=SEQ_LEN, batch_size=BATCH, steps=3,
        save_every=3, checkpoint_dir=str(directory), tracking=False, system_metrics=False,
        optimizer="optax.contrib.schedule_free_adamw(1e-2)",
    )  # fmt: skip
    trainer = build_trainer(config)
    trainer.train()
    state = trainer.state
    averaged = optax.contrib.schedule_free_eval_params(state.opt_state, state.params)
    loaded = keras.saving.load_model(export(directory, tmp_path / "out", format="keras"))
    assert_same(dict(zip(trainer.key_groups["params"], loaded.trainable_variables)), averaged)
