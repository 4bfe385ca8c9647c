"""Early stopping on eval_loss: where it stops, what it saves and logs, and what resume does."""

import shutil

import optax
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from kithara_ops import Callback, Trainer, data
from kithara_ops._backend import seed_keras
from kithara_ops.checkpoint.checkpointer import Checkpointer
from kithara_ops.cli import app
from kithara_ops.errors import ConfigError
from kithara_ops.stopping import Bests, stop_reason

PATIENCE, MIN_DELTA = 2, 0.05


class Evals(Callback):
    def __init__(self):
        self.seen = {}

    def on_eval(self, step, metrics):
        self.seen[step] = metrics["eval_loss"]


def stop_step_by_hand(evals, patience, min_delta):
    """The rule written out: an evaluation improves when it beats the last improvement by
    more than min_delta; ``patience`` evaluations in a row without one stop the run."""
    reference, stale = None, 0
    for step in sorted(evals):
        if reference is None or evals[step] < reference - min_delta:
            reference, stale = evals[step], 0
        else:
            stale += 1
        if stale >= patience:
            return step
    return None


def saved(root, step):
    """The checkpointed steps under ``root`` and the record of ``step``."""
    checkpoints = Checkpointer(root / "ckpt")
    try:
        return checkpoints.steps(), checkpoints.read_record(step)
    finally:
        checkpoints.close()


def trainer(make_model, tmp_path, steps, callbacks=(), **options):
    train = data.load("synthetic", seq_len=32, batch_size=8, seed=0)
    held_out = data.load("synthetic", seq_len=32, batch_size=8, seed=1, repeat=False,
                         shuffle=False)  # fmt: skip
    return Trainer(
        make_model(), optax.adamw(3e-2), train, eval_data=held_out, steps=steps, eval_every=2,
        eval_steps=1, log_every=2, checkpoint_dir=str(tmp_path / "ckpt"), system_metrics=False,
        tracking_uri=f"sqlite:///{tmp_path}/runs.db", callbacks=list(callbacks), **options,
    )  # fmt: skip


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):

    from kithara_ops import models

    def make_model():
        seed_keras(0)
        return models.causal_lm("tiny", seq_len=32)

    tmp_path = tmp_path_factory.mktemp("early")
    evals = Evals()
    run = trainer(make_model, tmp_path, 60, [evals], early_stop_patience=PATIENCE,
                  early_stop_min_delta=MIN_DELTA)  # fmt: skip
    return {"result": run.train(), "evals": evals.seen, "dir": tmp_path, "model": make_model}


def test_the_run_stops_at_the_step_the_patience_implies(stopped):
    result, evals = stopped["result"], stopped["evals"]
    expected = stop_step_by_hand(evals, PATIENCE, MIN_DELTA)
    assert expected is not None and expected < 60
    assert result.step == expected == max(evals)
    assert result.stop_reason == "early_stop"
    # The final checkpoint is the stopped step's, and records why and where the count stood.
    steps, record = saved(stopped["dir"], expected)
    assert steps[-1] == expected
    assert record.stop_reason == "early_stop"
    bests = Bests.from_json(record.bests)
    assert bests.stale == PATIENCE
    assert bests.eval_loss == pytest.approx(min(evals.values()))
    assert stop_reason(bests, PATIENCE, None) == "early_stop"


def test_the_stopped_run_is_finished_in_mlflow_with_its_best_values(stopped):
    result, evals = stopped["result"], stopped["evals"]
    run = MlflowClient(f"sqlite:///{stopped['dir']}/runs.db").get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["kithara_ops.stop_reason"] == "early_stop"
    best_step = min(evals, key=evals.get)
    assert run.data.metrics["best_eval_loss"] == pytest.approx(evals[best_step])
    assert run.data.metrics["best_step"] == best_step
    assert "steps_to_target" not in run.data.metrics


def test_resume_refuses_the_same_rule_and_goes_on_with_more_patience(stopped, tmp_path):
    step, root = stopped["result"].step, tmp_path / "copy"
    shutil.copytree(stopped["dir"], root)  # the other tests read the stopped run as it was
    again = trainer(stopped["model"], root, 60, early_stop_patience=PATIENCE,
                    early_stop_min_delta=MIN_DELTA)  # fmt: skip
    with pytest.raises(ConfigError, match=f"stopped early at step {step}.*--early-stop-patience"):
        again.train(resume=True)
    before = Bests.from_json(saved(root, step)[1].bests)
    evals = Evals()
    patient = trainer(stopped["model"], root, step + 2, [evals],
                      early_stop_patience=PATIENCE + 10, early_stop_min_delta=MIN_DELTA)  # fmt: skip
    result = patient.train(resume=True)
    assert result.step == step + 2 and result.stop_reason is None
    assert list(evals.seen) == [step + 2]
    # The count went on from the checkpoint's: one more evaluation without improvement.
    _, record = saved(root, step + 2)
    improved = evals.seen[step + 2] < before.reference - MIN_DELTA
    assert Bests.from_json(record.bests).stale == (0 if improved else PATIENCE + 1)
    assert record.stop_reason is None
    # The MLflow run is the same one; its stop_reason now says the run went on to its end.
    run = MlflowClient(f"sqlite:///{root}/runs.db").get_run(result.run_id)
    assert result.run_id == stopped["result"].run_id
    assert run.data.tags["kithara_ops.stop_reason"] == "completed"


def test_a_target_stops_at_the_first_evaluation_that_reaches_it(stopped, tmp_path):
    evals = stopped["evals"]
    target = evals[4]  # the same seed, data and optimizer reach it again at step 4 at the latest
    expected = min(step for step, value in evals.items() if value <= target)
    seen = Evals()
    result = trainer(stopped["model"], tmp_path, 60, [seen], target_eval_loss=target).train()
    assert result.step == expected and result.stop_reason == "target_eval_loss"
    run = MlflowClient(f"sqlite:///{tmp_path}/runs.db").get_run(result.run_id)
    assert run.data.metrics["steps_to_target"] == expected
    assert run.data.tags["kithara_ops.stop_reason"] == "target_eval_loss"


def test_early_stopping_without_eval_data_is_refused_before_anything_runs(tmp_path, make_model):
    result = CliRunner().invoke(app, ["train", "--early-stop-patience", "3", "--no-tracking"])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--eval-data" in lines[0] and "early_stop_patience" in lines[0]
    train = data.load("synthetic", seq_len=32, batch_size=8)
    with pytest.raises(ConfigError, match=r"target_eval_loss .* no evaluation data"):
        Trainer(make_model(), optax.sgd(0.1), train, target_eval_loss=2.0, tracking=False)
    for bad in (["--early-stop-patience", "0"], ["--early-stop-min-delta", "-1"]):
        refused = CliRunner().invoke(app, ["train", *bad, "--no-tracking"])
        assert refused.exit_code == 2 and bad[0].lstrip("-").replace("-", "_") in refused.stderr
