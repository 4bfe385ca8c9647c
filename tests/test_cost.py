"""What a step costs: XLA's FLOP count, the 6·N·tokens estimate, FLOP/s, MFU, memory."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import BATCH, SEQ_LEN

from kithara_ops import Callback, Trainer, cost, data


def test_xla_counts_a_matmul_as_two_m_k_n_flops():
    m, k, n = 16, 32, 8
    lowered = jax.jit(jnp.matmul).lower(
        jax.ShapeDtypeStruct((m, k), jnp.float32), jax.ShapeDtypeStruct((k, n), jnp.float32)
    )
    assert cost.xla_flops(lowered) == 2 * m * k * n


def test_an_analysis_without_flops_gives_none():
    assert cost.xla_flops(types.SimpleNamespace(cost_analysis=lambda: {})) is None
    assert cost.xla_flops(types.SimpleNamespace(cost_analysis=lambda: [{"flops": 5.0}])) == 5.0

    def fails():
        raise NotImplementedError

    assert cost.xla_flops(types.SimpleNamespace(cost_analysis=fails)) is None


def test_peak_and_mfu_from_known_device_kinds():
    v5e = types.SimpleNamespace(device_kind="TPU v5 lite")
    assert cost.peak_flops([v5e] * 4) == 4 * 197e12
    assert cost.peak_flops([v5e, types.SimpleNamespace(device_kind="cpu")]) is None
    step = cost.StepCost(num_params=1_000, tokens_per_step=10, devices=[v5e] * 2)
    assert (step.flops_per_step, step.source) == (6 * 1_000 * 10, "6N")
    metrics = step.metrics(step_time_seconds=0.5)
    assert metrics["flops_per_second"] == pytest.approx(60_000 / 0.5)
    assert metrics["mfu"] == pytest.approx(60_000 / 0.5 / (2 * 197e12))
    assert "mfu" not in cost.StepCost(1_000, 10, jax.devices()).metrics(0.5)


def test_device_memory_is_the_busiest_devices(monkeypatch):
    stats = [{"bytes_in_use": 10, "peak_bytes_in_use": 30}, {"bytes_in_use": 20}, None]
    devices = [types.SimpleNamespace(memory_stats=lambda s=s: s) for s in stats]
    monkeypatch.setattr(jax, "local_devices", lambda: devices)
    assert cost.device_memory() == {"device_memory_bytes": 20.0, "device_memory_peak_bytes": 30.0}
    monkeypatch.setattr(jax, "local_devices", lambda: devices[2:])
    assert cost.device_memory() == {}


def test_a_run_logs_xlas_flops_per_step_and_the_flop_rate(make_model):
    logged = []

    class Logs(Callback):
        def on_log(self, step, metrics):
            logged.append((step, dict(metrics)))

    model = make_model()
    train = data.load("synthetic", seq_len=SEQ_LEN, batch_size=BATCH)
    trainer = Trainer(model, optax.adamw(1e-3), train, steps=6, log_every=3, tracking=False,
                      callbacks=[Logs()])  # fmt: skip
    trainer.train()
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_sharding)
        for k, v in next(iter(train)).items()
    }
    lowered = trainer.steps.train_step.lower(trainer.state_template().abstract, batch)
    expected = cost.xla_flops(lowered)
    weights = sum(int(np.prod(v.shape)) for v in model.weights)
    # XLA's count and the estimate agree to within attention's share at this length.
    assert expected == pytest.approx(6 * weights * BATCH * SEQ_LEN, rel=0.1)
    last_step, last = logged[-1]
    assert last_step == 6 and last["flops_per_step"] == expected
    assert last["flops_per_second"] == pytest.approx(expected / last["step_time_seconds"])
    assert [("compile_seconds" in m) for _, m in logged] == [True, False]
    assert logged[0][1]["compile_seconds"] > 0
