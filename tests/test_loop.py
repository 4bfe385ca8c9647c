"""The loop alone: a Trainer over a fake program (no model, nothing compiled).

The fake's step adds the batch's mean to one parameter and reports a loss of ``10 / step``
(or a NaN at a chosen step); its evaluation reports the parameter. So every number the loop
hands its sinks can be predicted, and the cadence of logging, evaluation, stops and
failures is tested apart from any model or optimizer.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kithara_ops import Callback, ConfigError, RunConfig, Trainer, feed
from kithara_ops.errors import Diverged, StoreFailed
from kithara_ops.sharding import batch_sharding, make_mesh
from kithara_ops.sinks import Sinks
from kithara_ops.start import Start
from kithara_ops.state import TrainState

BATCHES = [{"x": np.full((2, 4), i, np.int32), "y": np.zeros((2, 4), np.int32)} for i in range(8)]


class FakeProgram:
    """What the loop reads of a ``Program``, with a step in plain Python."""

    def __init__(self, nan_at: int | None = None, **options):
        self.config = RunConfig(tracking=False, steps=6, batch_size=2, seq_len=4, **options)
        self.mesh = make_mesh("dp", devices=jax.devices()[:1])
        self.batch_sharding = batch_sharding(self.mesh)
        self.model = types.SimpleNamespace(weights=[], variables=[], trainable_variables=[])
        self.adapter = types.SimpleNamespace(optimizer="fake")
        self.description = {"label": "fake"}
        self.key_groups = {"params": ["w"], "non_trainable": []}
        self.state_shardings, self.base_model, self.given = None, None, frozenset()
        self.steps = types.SimpleNamespace(train_step=self.train_step)
        self.nan_at, self.written_back = nan_at, []

    def fresh_state(self, step: int = 0, w: float = 0.0) -> TrainState:
        return TrainState(
            step=jnp.int32(step), params={"w": jnp.float32(w)}, non_trainable={}, opt_state={},
            rng=jax.random.PRNGKey(0),
        )  # fmt: skip

    def template(self):
        raise AssertionError("a fresh start needs no template")

    def train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
        step = state.step + 1
        loss = jnp.where(step == (self.nan_at or -1), jnp.nan, 10.0 / step)
        new = TrainState(step, {"w": state.params["w"] + jnp.mean(batch["x"])}, {}, {}, state.rng)
        return new, {"loss": loss, "finite": jnp.isfinite(loss), "tokens": jnp.float32(8)}

    def eval_loss(self, state: TrainState, batches) -> float:
        list(batches)
        return float(state.params["w"])

    def write_back(self, state: TrainState) -> None:
        self.written_back.append(int(state.step))

    def held_variables(self) -> list:
        return []


class Recorder(Callback):
    def __init__(self, fail_at: int | None = None):
        self.logs, self.evals, self.steps, self.ends = {}, {}, [], []
        self.fail_at, self.asked = fail_at, 0

    def on_log(self, step, metrics):
        self.logs[step] = metrics

    def on_eval(self, step, metrics):
        self.evals[step] = metrics

    def on_step(self, record):
        self.steps.append((record.step, record.stopping))

    def failure(self):  # asked once after each step, before the step is reported
        self.asked += 1
        return OSError("the store is full") if self.asked == self.fail_at else None

    def on_train_end(self, status, result):
        self.ends.append((status, result and result.step))


def loop(program: FakeProgram, recorder: Recorder, eval_data=None) -> Trainer:
    sinks = Sinks([recorder])
    return Trainer.from_program(program, list(BATCHES), eval_data=eval_data, sinks=sinks)


def test_the_loop_steps_logs_and_evaluates_at_its_cadence():
    program, recorder = FakeProgram(log_every=4, eval_every=4), Recorder()
    result = loop(program, recorder, eval_data=BATCHES[:2]).train()
    assert result.step == 6 and result.loss == pytest.approx(10 / 6)
    assert sorted(recorder.logs) == [4, 6]  # every 4 steps and at the last
    assert recorder.logs[4]["loss"] == pytest.approx(2.5)
    assert recorder.logs[6]["nonfinite_steps"] == 0
    # The parameter after step s is the sum of the first s batches' values: 0 + 1 + ... .
    assert {s: m["eval_loss"] for s, m in recorder.evals.items()} == {4: 6.0, 6: 15.0}
    assert result.eval_loss == 15.0
    assert recorder.steps == [(s, False) for s in range(1, 7)]
    assert program.written_back == [6] and recorder.ends == [("FINISHED", 6)]


def test_a_run_continues_from_the_start_it_is_given():
    program, recorder = FakeProgram(log_every=1), Recorder()
    trainer = loop(program, recorder)
    begin = Start(program.fresh_state(step=3, w=3.0), "uid")
    stream = feed.DataStream(list(BATCHES))
    result = trainer.run(begin, stream, (2, 4), total=6, started=0.0)
    assert [s for s, _ in recorder.steps] == [4, 5, 6]
    assert float(trainer.state.params["w"]) == 3.0 + 3 + 4 + 5  # batches 3, 4, 5 follow
    assert result.step == 6
    with pytest.raises(ConfigError, match="already at step 6"):
        trainer.run(Start(program.fresh_state(step=6), "uid"), stream, (2, 4), 6, 0.0)


def test_a_non_finite_loss_stops_the_run_at_the_next_logging_step():
    program, recorder = FakeProgram(nan_at=3, log_every=2), Recorder()
    with pytest.raises(Diverged) as diverged:
        loop(program, recorder).train()
    assert diverged.value.step == 4  # flagged at step 3, read at the logging step after it
    assert recorder.ends == [("DIVERGED", None)] and program.written_back == []


def test_a_failed_sink_ends_the_run_after_that_step_which_is_reported_as_the_last():
    program, recorder = FakeProgram(log_every=10), Recorder(fail_at=2)
    with pytest.raises(StoreFailed, match="the store is full; the run stopped after step 2"):
        loop(program, recorder).train()
    assert recorder.steps == [(1, False), (2, True)]
    assert program.written_back == [2] and recorder.ends == [("FAILED", None)]
