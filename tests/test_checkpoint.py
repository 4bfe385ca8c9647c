"""Checkpoints: exact resume, chosen steps, content, optimizer changes, hardware, damage."""

import contextlib
import dataclasses
import datetime
import logging
import math
import shutil

import jax
import keras
import numpy as np
import optax
import pytest
from conftest import BATCH, SEQ_LEN
from mlflow import MlflowClient

from kithara_ops import Callback, ConfigError, Trainer, data, describe_optimizer, models
from kithara_ops._backend import seed_keras
from kithara_ops.checkpoint.checkpointer import Checkpointer
from kithara_ops.checkpoint.integrity import signature
from kithara_ops.checkpoint.record import RECORD_VERSION
from kithara_ops.checkpoint.restore import restore_latest

KERNEL = "causal_lm/block_0/mlp/gate/kernel"


class Recorder(Callback):
    """Keeps every logged training loss and evaluation loss, by step."""

    def __init__(self):
        self.losses, self.evals = {}, {}

    def on_log(self, step, metrics):
        self.losses[step] = metrics["loss"]

    def on_eval(self, step, metrics):
        self.evals[step] = metrics["eval_loss"]


def synthetic():
    """The deterministic, resumable training data every test here uses."""
    return data.load("synthetic", seq_len=SEQ_LEN, batch_size=BATCH, seed=0)


def trainer_for(model, optimizer, **options):
    """A Trainer on the synthetic data, without system metrics (slow to start)."""
    options.setdefault("system_metrics", False)
    return Trainer(model, optimizer, synthetic(), **options)


@contextlib.contextmanager
def opened(directory):
    """A Checkpointer for reading ``directory``, closed afterwards."""
    checkpointer = Checkpointer(directory)
    try:
        yield checkpointer
    finally:
        checkpointer.close()


def saved_signature(checkpointer, step):
    """``{leaf path: (shape, dtype)}`` of a saved state, read from its metadata only."""
    return signature(checkpointer.saved_structure(step))


def host(tree):
    return jax.tree.map(np.asarray, tree)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def slot(param_key, name):
    """The optimizer-state key of a Keras slot variable of parameter ``param_key``."""
    return f"{param_key.replace('/', '_')}_{name}"


def copy_dir(source, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(source, target)
    return target


def loss_history(run_id):
    points = MlflowClient().get_metric_history(run_id, "loss")
    return sorted((p.step, p.value) for p in points)


@dataclasses.dataclass
class Saved:
    """A finished ``optax.adamw(1e-3)`` run of 4 steps, saved at steps 2 and 4."""

    directory: object
    params: dict
    opt_state: object
    losses: dict
    run_id: str


@pytest.fixture(scope="module")
def saved_adamw(tmp_path_factory):
    directory = tmp_path_factory.mktemp("saved-adamw") / "ckpt"
    seed_keras(0)
    model = models.causal_lm("tiny", seq_len=SEQ_LEN)
    recorder = Recorder()
    trainer = trainer_for(
        model,
        optax.adamw(1e-3),
        steps=4,
        log_every=1,
        checkpoint_dir=str(directory),
        save_every=2,
        callbacks=[recorder],
    )
    result = trainer.train()
    return Saved(
        directory,
        host(trainer.state.params),
        host(trainer.state.opt_state),
        recorder.losses,
        result.run_id,
    )


# ------------------------------------------------------------------------------ exact resume
EXACT_OPTIMIZERS = {
    "keras-adamw-cosine": lambda: keras.optimizers.AdamW(
        keras.optimizers.schedules.CosineDecay(1e-3, 10, warmup_target=3e-3, warmup_steps=3)
    ),
    "optax-clip-adamw-warmup-cosine": lambda: optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 3, 10)),
    ),
    "keras-sgd-momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "optax-sgd-momentum": lambda: optax.sgd(0.05, momentum=0.9),
}


@pytest.mark.parametrize("make_optimizer", EXACT_OPTIMIZERS.values(), ids=EXACT_OPTIMIZERS)
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(make_model, tmp_path, make_optimizer):
    straight = trainer_for(make_model(), make_optimizer(), steps=10, log_every=1, tracking=False)
    straight_result = straight.train()

    directory = str(tmp_path / "ckpt")  # created empty by the first Trainer
    recorder = Recorder()
    first = trainer_for(
        make_model(),
        make_optimizer(),
        steps=4,
        log_every=1,
        checkpoint_dir=directory,
        save_every=2,
        callbacks=[recorder],
    )
    # resume=True with nothing saved yet starts at step 0 (a job that always asks to resume).
    first_result = first.train(resume=True)
    assert first_result.step == 4 and sorted(recorder.losses) == [1, 2, 3, 4]
    assert recorder.losses[1] > 5.0  # ~ln(259): the initial weights
    # A new process: a fresh model and optimizer object, the same seed.
    resumed = trainer_for(
        make_model(), make_optimizer(), steps=10, log_every=1, checkpoint_dir=directory
    )
    resumed_result = resumed.train(resume=True)

    assert int(resumed.state.step) == 10 and resumed_result.step == 10
    assert_trees_equal(resumed.state.params, straight.state.params)
    assert_trees_equal(resumed.state.opt_state, straight.state.opt_state)
    assert resumed_result.metrics["learning_rate"] == straight_result.metrics["learning_rate"]
    assert resumed_result.loss == straight_result.loss

    assert first_result.run_id is not None
    assert resumed_result.run_id == first_result.run_id
    assert [step for step, _ in loss_history(resumed_result.run_id)] == list(range(1, 11))


# ------------------------------------------------------------------------------ resume=STEP
def test_resume_from_a_chosen_step(make_model, tmp_path, saved_adamw):
    directory = copy_dir(saved_adamw.directory, tmp_path)
    with opened(directory) as checkpointer:
        assert checkpointer.steps() == [2, 4]

    trainer = trainer_for(
        make_model(), optax.adamw(1e-3), steps=6, log_every=1, checkpoint_dir=str(directory)
    )
    with pytest.raises(ConfigError, match=r"No checkpoint at step 3 .*saved steps: 2, 4\."):
        trainer.train(resume=3)

    recorder = Recorder()
    trainer = trainer_for(
        make_model(),
        optax.adamw(1e-3),
        steps=6,
        log_every=1,
        checkpoint_dir=str(directory),
        callbacks=[recorder],
    )
    result = trainer.train(resume=2)
    assert sorted(recorder.losses) == [3, 4, 5, 6]
    assert int(trainer.state.step) == 6 and result.step == 6
    # Steps 3 and 4 replay the saved run exactly.
    assert recorder.losses[3] == saved_adamw.losses[3]
    assert recorder.losses[4] == saved_adamw.losses[4]


# ---------------------------------------------------------------------------- content
def test_checkpoint_holds_the_state_and_what_a_resume_needs(make_model, tmp_path):
    optimizer = optax.adamw(1e-3)
    trainer = trainer_for(
        make_model(),
        optimizer,
        steps=6,
        log_every=1,
        checkpoint_dir=str(tmp_path),
        save_every=2,
        keep=2,
    )
    started = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    result = trainer.train()

    with opened(tmp_path) as checkpointer:
        assert checkpointer.steps() == [4, 6]
        record = checkpointer.read_record(6)
        saved = saved_signature(checkpointer, 6)
        restored = checkpointer.restore(6, trainer.state_template().abstract)
        assert record.to_json()["version"] == RECORD_VERSION

    assert record.step == 6
    # Batches consumed are the step; only the iterator's own position is recorded.
    assert record.data_position["next_batch"] == 6
    assert record.loss == result.loss
    assert record.config == trainer.config.to_dict()
    assert record.config["steps"] == 6 and record.config["keep"] == 2
    assert record.optimizer["label"] == describe_optimizer(optimizer)["label"]
    assert record.optimizer["family"] == "optax" and record.optimizer["name"] == "adamw"
    assert record.keys["params"] == trainer.param_keys
    # The MLflow run carries the record's run identity as a tag.
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["kithara_ops.run_uid"] == record.run_uid and len(record.run_uid) == 32
    assert record.mlflow_run_id is None
    assert set(record.versions) == {"jax", "keras", "optax", "orbax-checkpoint", "kithara-ops"}
    assert record.versions["jax"] == jax.__version__
    assert record.versions["keras"] == keras.__version__
    saved_at = datetime.datetime.fromisoformat(record.saved_at)
    assert started <= saved_at <= datetime.datetime.now(datetime.UTC)

    assert saved["step"] == ((), "int32")
    assert saved["rng"] == ((2,), "uint32")
    assert saved["opt_state/0/count"] == ((), "int32")
    for key, param in trainer.state.params.items():
        assert saved[f"params/{key}"] == (tuple(param.shape), "float32"), key
        assert saved[f"opt_state/0/mu/{key}"] == (tuple(param.shape), "float32"), key
    assert saved["params/causal_lm/lm_head/kernel"][0] == (128, 259)
    assert_trees_equal(restored, trainer.state)


# ------------------------------------------------------------------------ optimizer change
def test_a_different_optimizer_is_refused_unless_reset(make_model, tmp_path, saved_adamw):
    directory = copy_dir(saved_adamw.directory, tmp_path)
    with opened(directory) as checkpointer:
        saved_label = checkpointer.read_record(4).optimizer["label"]
    sgd = optax.sgd(0.1, momentum=0.9)
    new_label = describe_optimizer(sgd)["label"]
    assert saved_label != new_label

    recorder = Recorder()
    trainer = trainer_for(
        make_model(),
        sgd,
        steps=6,
        log_every=1,
        checkpoint_dir=str(directory),
        callbacks=[recorder],
    )
    with pytest.raises(ConfigError) as error:
        trainer.train(resume=True)
    message = str(error.value)
    assert repr(saved_label) in message and repr(new_label) in message
    assert "reset" in message

    restored = restore_latest(trainer.sinks.checkpoints, trainer.state_template(), True, True)
    assert restored.step == 4 and restored.optimizer_change == "reset"
    assert_trees_equal(restored.state.params, saved_adamw.params)
    assert_trees_equal(restored.state.opt_state, host(sgd.init(saved_adamw.params)))

    result = trainer.train(resume=True, reset_optimizer=True)
    assert int(trainer.state.step) == 6 and result.step == 6
    assert sorted(recorder.losses) == [5, 6]
    assert recorder.losses[5] < 1.1 * saved_adamw.losses[4]

    client = MlflowClient()
    assert result.run_id == saved_adamw.run_id
    run = client.get_run(result.run_id)
    assert run.data.tags["kithara_ops.optimizer_reset_at_step"] == "4"
    assert run.data.tags["optimizer.label"] == new_label
    artifacts = [a.path for a in client.list_artifacts(result.run_id, "optimizer")]
    assert "optimizer/optimizer-from-step-4.json" in artifacts


def test_keras_adamw_state_migrates_to_optax_adamw(make_model, tmp_path):
    def keras_adamw():
        return keras.optimizers.AdamW(1e-3, weight_decay=0.004, epsilon=1e-7)

    def optax_adamw():
        return optax.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-7, weight_decay=0.004)

    saved_losses = Recorder()
    saved = trainer_for(
        make_model(),
        keras_adamw(),
        steps=6,
        log_every=1,
        checkpoint_dir=str(tmp_path),
        callbacks=[saved_losses],
    )
    saved.train()
    keras_state = host(saved.state.opt_state)

    migrated_losses = Recorder()
    migrated = trainer_for(
        make_model(),
        optax_adamw(),
        steps=12,
        log_every=1,
        checkpoint_dir=str(tmp_path),
        callbacks=[migrated_losses],
    )
    restored = restore_latest(migrated.sinks.checkpoints, migrated.state_template(), True, False)
    assert restored.step == 6 and restored.optimizer_change == "migrated"
    adam = restored.state.opt_state[0]
    assert int(adam.count) == 6
    for key in migrated.param_keys:
        np.testing.assert_array_equal(adam.mu[key], keras_state[slot(key, "momentum")], key)
        np.testing.assert_array_equal(adam.nu[key], keras_state[slot(key, "velocity")], key)

    migrated.train(resume=True)
    assert int(migrated.state.opt_state[0].count) == 12
    assert sorted(migrated_losses.losses) == list(range(7, 13))

    reference_losses = Recorder()
    trainer_for(
        make_model(),
        keras_adamw(),
        steps=12,
        log_every=1,
        tracking=False,
        callbacks=[reference_losses],
    ).train()
    for step in range(7, 13):
        assert migrated_losses.losses[step] == pytest.approx(
            reference_losses.losses[step], rel=1e-3
        ), step
    assert migrated_losses.losses[7] < 1.1 * saved_losses.losses[6]


def test_optax_adamw_state_migrates_to_keras_adamw(make_model, tmp_path, saved_adamw):
    directory = copy_dir(saved_adamw.directory, tmp_path)
    recorder = Recorder()
    trainer = trainer_for(
        make_model(),
        keras.optimizers.AdamW(1e-3, weight_decay=1e-4),
        steps=6,
        log_every=1,
        checkpoint_dir=str(directory),
        callbacks=[recorder],
    )
    restored = restore_latest(trainer.sinks.checkpoints, trainer.state_template(), True, False)
    assert restored.optimizer_change == "migrated"
    adam = saved_adamw.opt_state[0]
    for key in trainer.param_keys:
        np.testing.assert_array_equal(restored.state.opt_state[slot(key, "momentum")], adam.mu[key])
        np.testing.assert_array_equal(restored.state.opt_state[slot(key, "velocity")], adam.nu[key])

    result = trainer.train(resume=True)
    assert result.step == 6 and sorted(recorder.losses) == [5, 6]
    iteration = next(v for k, v in trainer.state.opt_state.items() if k.endswith("iteration"))
    assert int(iteration) == 6
    assert math.isfinite(result.loss)
    assert recorder.losses[5] < 1.1 * saved_adamw.losses[4]


# --------------------------------------------------------------------------- other hardware
def test_resume_on_different_devices_and_sharding(make_model, tmp_path, eight_devices):
    one = eight_devices[:1]
    # A larger eps keeps Adam from amplifying reduction-order noise in near-zero gradients.
    optimizer = optax.adamw(1e-3, eps=1e-4)
    sharded_dir, single_dir = str(tmp_path / "fsdp"), str(tmp_path / "single")

    sharded = trainer_for(
        make_model(), optimizer, steps=4, sharding="fsdp", checkpoint_dir=sharded_dir
    )
    sharded.train()
    assert not sharded.state.params[KERNEL].sharding.is_fully_replicated

    # Saved on 8 devices with fsdp, resumed on 1.
    resumed = trainer_for(make_model(), optimizer, steps=6, devices=one, checkpoint_dir=sharded_dir)
    restored = restore_latest(resumed.sinks.checkpoints, resumed.state_template(), True, False)
    assert restored.step == 4
    for key, value in [*restored.state.params.items(), ("step", restored.state.step)]:
        assert value.sharding.device_set == {one[0]}, key
    resumed.train(resume=True)

    straight = trainer_for(make_model(), optimizer, steps=6, devices=one, checkpoint_dir=single_dir)
    straight.train()
    for key, value in resumed.state.params.items():
        assert value.sharding.device_set == {one[0]}, key
        np.testing.assert_allclose(
            np.asarray(value), np.asarray(straight.state.params[key]), rtol=1e-4, atol=1e-5
        )

    # Saved on 1 device, resumed with fsdp on 8.
    widened = trainer_for(
        make_model(), optimizer, steps=7, sharding="fsdp", checkpoint_dir=single_dir
    )
    assert widened.train(resume=True).step == 7
    kernel = widened.state.params[KERNEL]
    assert not kernel.sharding.is_fully_replicated
    assert len(kernel.sharding.device_set) == 8
    assert math.prod(kernel.addressable_shards[0].data.shape) == kernel.size // 8
    assert widened.state.opt_state[0].mu[KERNEL].sharding == kernel.sharding


# ---------------------------------------------------------------------------------- damage
@pytest.fixture(scope="module")
def saved_for_damage(tmp_path_factory):
    """A run of its own (its MLflow history is checked), saved at steps 2 and 4."""
    directory = tmp_path_factory.mktemp("saved-damage") / "ckpt"
    seed_keras(0)
    recorder = Recorder()
    result = trainer_for(
        models.causal_lm("tiny", seq_len=SEQ_LEN),
        optax.adamw(1e-3),
        steps=4,
        log_every=1,
        checkpoint_dir=str(directory),
        save_every=2,
        callbacks=[recorder],
    ).train()
    return directory, recorder.losses, result.run_id


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(
    make_model, tmp_path, saved_for_damage, caplog
):
    source, saved_losses, run_id = saved_for_damage
    directory = copy_dir(source, tmp_path)
    shutil.rmtree(directory / "4" / "state")
    with opened(directory) as checkpointer:
        assert checkpointer.steps() == [2, 4]

    recorder = Recorder()
    trainer = trainer_for(
        make_model(),
        optax.adamw(1e-3),
        steps=6,
        log_every=1,
        checkpoint_dir=str(directory),
        callbacks=[recorder],
    )
    with caplog.at_level(logging.WARNING, logger="kithara_ops.checkpoint"):
        result = trainer.train(resume=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 4" in w and "cannot be read" in w for w in warnings), warnings

    assert int(trainer.state.step) == 6 and result.step == 6
    assert sorted(recorder.losses) == [3, 4, 5, 6]
    assert recorder.losses[3] == saved_losses[3]
    assert recorder.losses[4] == saved_losses[4]
    assert result.run_id == run_id
    history = loss_history(run_id)
    assert [step for step, _ in history] == [1, 2, 3, 4, 5, 6]
    assert dict(history)[6] == pytest.approx(recorder.losses[6])


def test_every_checkpoint_damaged_is_an_error_not_a_restart(make_model, tmp_path, saved_for_damage):
    directory = copy_dir(saved_for_damage[0], tmp_path)
    for step in ("2", "4"):
        for path in (directory / step / "state").rglob("*"):
            if path.is_file():
                path.write_bytes(b"")
    trainer = trainer_for(
        make_model(), optax.adamw(1e-3), steps=6, checkpoint_dir=str(directory), tracking=False
    )
    with pytest.raises(ConfigError, match="every saved step is damaged"):
        trainer.train(resume=True)
    assert not hasattr(trainer, "state")


def test_retraining_over_a_damaged_checkpoint_saves_a_good_one(
    make_model, tmp_path, saved_for_damage
):
    directory = copy_dir(saved_for_damage[0], tmp_path)
    shutil.rmtree(directory / "4" / "state")
    trainer = trainer_for(
        make_model(),
        optax.adamw(1e-3),
        steps=4,
        save_every=2,
        checkpoint_dir=str(directory),
        tracking=False,
    )
    trainer.train(resume=True)  # falls back to 2 and trains steps 3 and 4 again
    assert int(trainer.state.step) == 4
    with opened(directory) as checkpointer:
        try:
            signature = saved_signature(checkpointer, 4)
        except Exception as err:  # the state of step 4 is still missing
            signature = {"error": repr(err)}
    assert "params/causal_lm/lm_head/kernel" in signature, signature


def test_a_half_written_save_is_not_a_checkpoint(make_model, tmp_path, saved_adamw):
    directory = copy_dir(saved_adamw.directory, tmp_path)
    # What a save of step 6 cut short leaves: Orbax writes to "<step>.orbax-checkpoint-tmp"
    # and renames it to "<step>" once complete.
    partial = directory / "6.orbax-checkpoint-tmp"
    (partial / "state" / "d").mkdir(parents=True)
    (partial / "state" / "d" / "0123abcd").write_bytes(b"half an array")
    (partial / "meta").mkdir()
    with opened(directory) as checkpointer:
        assert checkpointer.steps() == [2, 4]

    recorder = Recorder()
    trainer = trainer_for(
        make_model(),
        optax.adamw(1e-3),
        steps=6,
        log_every=1,
        save_every=2,
        checkpoint_dir=str(directory),
        tracking=False,
        callbacks=[recorder],
    )
    trainer.train(resume=True)
    assert sorted(recorder.losses) == [5, 6]
    assert int(trainer.state.step) == 6
    # Reaching step 6 again writes a complete checkpoint over the leftover.
    with opened(directory) as checkpointer:
        assert checkpointer.steps() == [2, 4, 6]
        assert checkpointer.read_record(6).step == 6
        assert signature(checkpointer.saved_structure(6))["step"] == ((), "int32")
    assert not partial.exists()


# ------------------------------------------------------------------------------ keep_best
@pytest.fixture
def eval_data():
    documents = data.read_documents("synthetic")[:12]
    return data.load(documents, seq_len=SEQ_LEN, batch_size=BATCH, shuffle=False, repeat=False)


def spiking_adam(from_step):
    """Adam at 3e-3 that jumps to 0.3 from ``from_step`` on, so the eval loss rises again."""
    return optax.adam(optax.piecewise_constant_schedule(3e-3, {from_step: 100.0}))


def train_keeping_best(model, directory, eval_data, spike_at, steps):
    """Train with eval and a save every 2 steps, keeping only the best; the result and evals."""
    recorder = Recorder()
    trainer = trainer_for(
        model, spiking_adam(spike_at), eval_data=eval_data, steps=steps, eval_every=2,
        save_every=2, keep=1, keep_best=True, checkpoint_dir=str(directory), tracking=False,
        callbacks=[recorder],
    )  # fmt: skip
    return trainer.train(), recorder.evals


def test_keep_best_keeps_the_lowest_eval_loss(make_model, tmp_path, eval_data):
    _, evals = train_keeping_best(make_model(), tmp_path, eval_data, spike_at=5, steps=8)
    assert sorted(evals) == [2, 4, 6, 8]
    best = min(evals, key=evals.get)
    assert best == 4 and evals[8] > evals[6] > evals[4]  # not simply the newest
    with opened(tmp_path) as checkpointer:
        # The best by eval_loss, and the newest: where a resume continues.
        assert checkpointer.steps() == [best, 8]
        assert checkpointer.read_record(best).eval_loss == evals[best]


def test_final_checkpoint_records_the_final_eval_loss(make_model, tmp_path, eval_data):
    result, evals = train_keeping_best(make_model(), tmp_path, eval_data, spike_at=4, steps=6)
    assert sorted(evals) == [2, 4, 6] and result.eval_loss == evals[6]
    assert evals[6] > evals[4]
    with opened(tmp_path) as checkpointer:
        kept = checkpointer.steps()
        recorded = {step: checkpointer.read_record(step).eval_loss for step in kept}
    assert recorded == {step: evals[step] for step in kept}
    assert kept == [4, 6]
