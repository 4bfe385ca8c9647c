"""Step metrics from an optimizer's own bookkeeping: ``clipped`` and Optax's counters."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import BATCH, SEQ_LEN

from kithara_ops import Callback, Trainer, data
from kithara_ops.optim.monitors import clipped, state_monitors

GRADS = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[0.5]])}  # norms 5 and 0.5, max |g| 4
GLOBAL = float(np.sqrt(25.0 + 0.25))


@pytest.mark.parametrize(
    ("kind", "limit", "expected"),
    [
        ("global_norm", GLOBAL - 0.01, 1.0),
        ("global_norm", GLOBAL + 0.01, 0.0),
        ("norm", 4.9, 1.0),
        ("norm", 5.1, 0.0),
        ("value", 3.9, 1.0),
        ("value", 4.1, 0.0),
    ],
)
def test_clipped_says_whether_the_threshold_acted(kind, limit, expected):
    flag = clipped(GRADS, optax.global_norm(GRADS), {"kind": kind, "value": limit})
    assert float(flag) == expected


def test_no_clipping_gives_no_flag():
    assert clipped(GRADS, optax.global_norm(GRADS), None) is None


def test_monitoring_wrappers_counters_are_read_from_the_state():
    params = {"w": jnp.zeros(3)}
    inner = optax.inject_hyperparams(optax.sgd)(learning_rate=0.25)
    opt = optax.MultiSteps(optax.apply_if_finite(inner, max_consecutive_errors=3), 2)
    state = opt.init(params)
    _, state = opt.update({"w": jnp.ones(3)}, state, params)
    values = {k: float(v) for k, v in state_monitors(state).items()}
    assert values == {
        "optax.mini_step": 1.0,
        "optax.gradient_step": 0.0,
        "optax.notfinite_count": 0.0,
        "optax.total_notfinite": 0.0,
        "optax.last_finite": 1.0,
        "optax.hyperparams.learning_rate": 0.25,
    }


def test_a_second_wrapper_of_a_kind_gets_a_suffix():
    params = {"w": jnp.zeros(2)}
    opt = optax.chain(
        optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
        optax.inject_hyperparams(optax.scale)(step_size=0.5),
    )
    values = state_monitors(opt.init(params))
    assert float(values["optax.hyperparams.learning_rate"]) == pytest.approx(0.1)
    assert float(values["optax.hyperparams.step_size"]) == 0.5


@pytest.mark.slow
def test_a_run_logs_clipping_and_the_mini_step(make_model):
    logged = []

    class Logs(Callback):
        def on_log(self, step, metrics):
            logged.append(dict(metrics))

    inner = optax.chain(optax.clip_by_global_norm(1e-3), optax.sgd(0.1))
    opt = optax.MultiSteps(inner, every_k_schedule=2)
    train = data.load("synthetic", seq_len=SEQ_LEN, batch_size=BATCH)
    Trainer(make_model(), opt, train, steps=3, log_every=1, tracking=False,
            callbacks=[Logs()]).train()  # fmt: skip
    assert [m["optax.mini_step"] for m in logged] == [1.0, 0.0, 1.0]
    assert [m["optax.gradient_step"] for m in logged] == [0.0, 1.0, 1.0]
    assert all(m["clipped"] == 1.0 and m["grad_norm"] > 1e-3 for m in logged)


def run_steps(opt, steps: int):
    """``optim.d`` after each of ``steps`` updates on a small quadratic."""
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    state, seen = opt.init(params), []
    for _ in range(steps):
        grads = {"w": 2.0 * params["w"]}
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        seen.append(float(state_monitors(state)["optim.d"]))
    return seen


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: optax.contrib.prodigy(1.0), "estim_lr"),
        (lambda: optax.contrib.dadapt_adamw(1.0), "estim_lr"),
    ],
    ids=["prodigy", "dadapt_adamw"],
)
def test_the_estimated_step_size_is_read_from_the_state(make, field):
    seen = run_steps(make(), 4)
    assert all(np.isfinite(seen)) and seen[-1] > seen[0]
    # The very value the state holds, also inside a wrapper.
    wrapped = optax.chain(optax.clip_by_global_norm(10.0), make())
    state = wrapped.init({"w": jnp.ones(2)})
    assert float(state_monitors(state)["optim.d"]) == float(getattr(state[1], field))


def test_mechanize_reports_its_learned_scale():
    # Its update is x0 - (sum of s) * (the base optimizer's accumulated updates).
    seen = run_steps(optax.contrib.mechanize(optax.sgd(0.1)), 4)
    assert all(np.isfinite(seen)) and seen[0] == pytest.approx(1e-6) and seen[-1] > seen[0]


def test_optimizers_without_an_estimate_log_no_step_size():
    assert "optim.d" not in state_monitors(optax.adam(1e-3).init({"w": jnp.ones(2)}))


@pytest.mark.slow
def test_a_prodigy_run_logs_its_step_size_every_step(make_model):
    logged = []

    class Logs(Callback):
        def on_log(self, step, metrics):
            logged.append(dict(metrics))

    train = data.load("synthetic", seq_len=SEQ_LEN, batch_size=BATCH)
    Trainer(make_model(), optax.contrib.prodigy(1.0), train, steps=6, log_every=1,
            tracking=False, callbacks=[Logs()]).train()  # fmt: skip
    d = [m["optim.d"] for m in logged]
    assert len(d) == 6 and all(np.isfinite(d)) and len(set(d)) > 1
    assert all(m["learning_rate"] == 1.0 for m in logged)  # the configured base
