"""Optimizer dynamics from the train step: ``update_norm``, ``param_norm`` and raw ``grad_norm``.

Checked against numpy on the tiny Embedding -> Dense model of ``test_step`` for both optimizer
families, then through the Trainer (logged values, MLflow, one compilation) with clipping
inside the optimizer, where the update is small and the raw gradient is not.
"""

from __future__ import annotations

import jax
import keras
import numpy as np
import optax
import pytest
from mlflow.tracking import MlflowClient
from test_step import make_batch, make_state, reference_loss, tiny_model

from kithara_ops import Callback, Trainer
from kithara_ops.optim import as_adapter
from kithara_ops.step import StepBuilder, global_norm

LR = 0.01
CLIP = 1e-3


def np_norm(arrays) -> float:
    """The global norm in float64, computed apart from the code under test."""
    return float(np.sqrt(sum((np.asarray(a, np.float64) ** 2).sum() for a in arrays)))


def adam_of(family: str):
    # Keras adds its epsilon where it weighs sqrt(1 - beta_2) times more: a tiny one keeps
    # both families' first update at lr * sign(g).
    return optax.adam(LR) if family == "optax" else keras.optimizers.Adam(LR, epsilon=1e-12)


def clipped_sgd_of(family: str):
    if family == "optax":
        return optax.chain(optax.clip_by_global_norm(CLIP), optax.sgd(0.1))
    return keras.optimizers.SGD(0.1, global_clipnorm=CLIP)


def test_global_norm_is_the_norm_of_every_array_as_one_vector():
    tree = {"a": np.array([3.0, 0.0], np.float32), "b": [np.array([[4.0]], np.float32)]}
    assert float(global_norm(tree)) == 5.0
    # bfloat16 arrays are summed in float32: 4096 squares of 1/64 make exactly 1.
    small = np.full(4096, 1 / 64, dtype=jax.numpy.bfloat16)
    assert float(global_norm([small])) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("family", ["optax", "keras"])
def test_norms_agree_with_numpy_over_two_steps(family):
    model = tiny_model()
    adapter = as_adapter(adam_of(family), model.trainable_variables)
    state, keys, nt_keys = make_state(model, adapter)
    step = jax.jit(StepBuilder(model, adapter, keys, nt_keys).train_step)
    for seed in (20, 21):
        batch = make_batch(4, seed=seed)
        before = [np.asarray(state.params[k]) for k in keys]
        _, grads = jax.value_and_grad(reference_loss)([jax.numpy.asarray(p) for p in before], batch)
        state, metrics = step(state, batch)
        after = [np.asarray(state.params[k]) for k in keys]

        raw = np_norm(grads)
        applied = np_norm([a - b for a, b in zip(after, before, strict=True)])
        assert applied > 1e-4  # the parameters moved: the check below means something
        np.testing.assert_allclose(float(metrics["grad_norm"]), raw, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["update_norm"]), applied, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["param_norm"]), np_norm(after), rtol=1e-6)
        if seed == 20:
            # Adam's first update is lr * sign(g) wherever g != 0 (|g| >> epsilon here), so its
            # norm is lr * sqrt(number of non-zero gradients), whatever the gradient's size.
            moved = sum(int((np.abs(np.asarray(g)) > 1e-6).sum()) for g in grads)
            np.testing.assert_allclose(float(metrics["update_norm"]), LR * np.sqrt(moved), 1e-3)


class Logged(Callback):
    """Keeps the metrics of every logging step."""

    def __init__(self):
        self.logs = {}

    def on_log(self, step, metrics):
        self.logs[step] = metrics


@pytest.mark.slow
@pytest.mark.parametrize("family", ["optax", "keras"])
def test_clipping_in_the_optimizer_shows_in_update_norm_not_grad_norm(
    family, make_model, stdlib_data, tmp_path
):
    logged = Logged()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trainer = Trainer(
        make_model(), clipped_sgd_of(family), stdlib_data, steps=2, log_every=1,
        callbacks=[logged], tracking=True, tracking_uri=uri, experiment="dynamics",
        system_metrics=False,
    )  # fmt: skip
    result = trainer.train()
    assert sorted(logged.logs) == [1, 2]
    for metrics in logged.logs.values():
        # The raw gradient of a fresh model is far above the clip; the applied update is the
        # clipped gradient times the learning rate: 1e-3 * 0.1.
        assert metrics["grad_norm"] > 100 * CLIP
        assert metrics["update_norm"] == pytest.approx(CLIP * 0.1, rel=1e-3)
    final = [np.asarray(v) for v in trainer.state.params.values()]
    assert logged.logs[2]["param_norm"] == pytest.approx(np_norm(final), rel=1e-6)
    assert trainer.steps.train_step._cache_size() == 1

    client = MlflowClient(uri)
    for name in ("update_norm", "param_norm", "grad_norm"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(result.run_id, name))
        assert history == [(step, pytest.approx(logged.logs[step][name])) for step in (1, 2)]
