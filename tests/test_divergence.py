"""A run whose loss stops being finite stops, is marked, and never overwrites good checkpoints."""

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optax
import pytest
from conftest import BATCH, SEQ_LEN
from mlflow import MlflowClient

from kithara_ops import Callback, Diverged, Trainer, data
from kithara_ops.checkpoint.checkpointer import Checkpointer
from kithara_ops.tracking.compare import compare_runs


class Recorder(Callback):
    def __init__(self):
        self.logs = {}

    def on_log(self, step, metrics):
        self.logs[step] = dict(metrics)


def synthetic():
    return data.load("synthetic", seq_len=SEQ_LEN, batch_size=BATCH, seed=0)


def poisoned(bad_steps, count=12):
    """Batches whose loss weights are NaN at the given 1-based steps."""
    batches = list(itertools.islice(synthetic(), count))
    for step in bad_steps:
        batch = dict(batches[step - 1])
        batch["mask"] = np.full_like(batch["mask"], np.nan)
        batches[step - 1] = batch
    return batches


def test_a_diverging_run_stops_and_keeps_only_finite_checkpoints(make_model, tmp_path):
    recorder = Recorder()
    trainer = Trainer(
        make_model(), optax.sgd(1e4), synthetic(), steps=40, log_every=2, save_every=1, keep=2,
        checkpoint_dir=str(tmp_path), callbacks=[recorder], experiment="diverging",
        system_metrics=False,
    )  # fmt: skip
    with pytest.raises(Diverged) as stopped:
        trainer.train()
    step = stopped.value.step
    message = str(stopped.value)
    assert step < 40 and "\n" not in message and f"diverged at step {step}" in message
    store = Checkpointer(tmp_path)
    try:
        saved = store.steps()
        assert saved and saved[-1] < step
        assert f"last good checkpoint is step {saved[-1]}" in message
        for kept in saved:
            state = store.restore(kept, trainer.state_template().abstract)
            assert all(np.isfinite(np.asarray(v)).all() for v in state.params.values()), kept
    finally:
        store.close()
    logged = recorder.logs[step]
    assert not math.isfinite(logged["loss"]) or not math.isfinite(logged["grad_norm"])
    assert logged["nonfinite_steps"] >= 1
    client = MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("diverging").experiment_id])[0]
    assert run.info.status == "FAILED"
    assert run.data.tags["kithara_ops.diverged_at_step"] == str(step)
    history = client.get_metric_history(run.info.run_id, "nonfinite_steps")
    assert history[-1].step == step and history[-1].value >= 1
    # Next to a run that trained, compare ranks the diverged one last and says so.
    Trainer(
        make_model(), optax.sgd(0.1), synthetic(), steps=4, log_every=2, experiment="diverging",
        system_metrics=False,
    ).train()  # fmt: skip
    ranked = compare_runs("diverging")
    assert [r.status for r in ranked] == ["FINISHED", f"DIVERGED@{step}"]
    assert math.isnan(ranked[1].final)


def test_skip_leaves_the_state_unchanged_on_non_finite_steps(make_model):
    def run(batches, **options):
        recorder = Recorder()
        trainer = Trainer(
            make_model(), optax.adam(1e-3), batches, steps=6, log_every=1, tracking=False,
            callbacks=[recorder], on_nonfinite="skip", **options,
        )  # fmt: skip
        trainer.train()
        return trainer, recorder

    clean, _ = run(poisoned([]))
    skipped, recorder = run(poisoned([3]))
    assert math.isnan(recorder.logs[3]["loss"])
    assert [recorder.logs[s]["nonfinite_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    # Step 3 changed nothing, so the two runs part ways there but stay finite.
    for value in skipped.state.params.values():
        assert np.isfinite(np.asarray(value)).all()
    assert any(
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(clean.state.params.values(), skipped.state.params.values(), strict=True)
    )


def test_skip_stops_after_patience_steps_in_a_row(make_model):
    trainer = Trainer(
        make_model(), optax.adam(1e-3), poisoned([2, 3, 4]), steps=8, log_every=4,
        tracking=False, on_nonfinite="skip", nonfinite_patience=3,
    )  # fmt: skip
    with pytest.raises(Diverged, match=r"at step 4 .*3 non-finite steps in a row"):
        trainer.train()
    tolerant = Trainer(
        make_model(), optax.adam(1e-3), poisoned([2, 3, 4]), steps=8, log_every=4,
        tracking=False, on_nonfinite="skip", nonfinite_patience=4,
    )  # fmt: skip
    assert tolerant.train().step == 8


def test_the_cli_stops_a_diverging_run_with_one_line_and_exit_1(tmp_path):
    """A real process: exit code 1 and one line on stderr, as a shell sees them."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    command = [
        sys.executable, "-m", "kithara_ops.cli", "train", "--optimizer", "optax.sgd(10000.0)",
        "--data", "synthetic", "--seq-len", "32", "--steps", "40", "--log-every", "2",
        "--checkpoint-dir", str(tmp_path / "run"), "--save-every", "1", "--no-tracking",
        "--quiet",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "training diverged at step" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert "--on-nonfinite skip" in errors[0]
