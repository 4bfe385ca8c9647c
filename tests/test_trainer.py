"""The Trainer: both optimizer families, sharding, accumulation, precision, eval, errors."""

import itertools
import math

import jax
import keras
import numpy as np
import optax
import pytest
from conftest import BATCH, SEQ_LEN

from kithara_ops import Callback, ConfigError, Trainer, data


class Recorder(Callback):
    """Keeps every logged and evaluated metric, by step."""

    def __init__(self):
        self.logs, self.evals, self.statuses = {}, {}, []

    def on_log(self, step, metrics):
        self.logs[step] = metrics

    def on_eval(self, step, metrics):
        self.evals[step] = metrics

    def on_train_end(self, status, result):
        self.statuses.append(status)


def params_of(trainer):
    return {k: np.asarray(v) for k, v in trainer.state.params.items()}


def assert_params_close(a, b, rtol=1e-5, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=atol, err_msg=key)


def test_keras_adamw_and_optax_chain_both_lower_the_loss(make_model, stdlib_data):
    keras_schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=25, warmup_target=3e-3, warmup_steps=5
    )
    optax_schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 5, 30)
    runs = {
        "keras": keras.optimizers.AdamW(keras_schedule, weight_decay=0.01),
        "optax": optax.chain(
            optax.clip_by_global_norm(1.0), optax.adamw(optax_schedule, weight_decay=0.01)
        ),
    }
    for family, optimizer in runs.items():
        recorder = Recorder()
        result = Trainer(
            make_model(),
            optimizer,
            stdlib_data,
            steps=30,
            log_every=1,
            callbacks=[recorder],
            tracking=False,
        ).train()
        first, last = recorder.logs[1]["loss"], recorder.logs[30]["loss"]
        assert first > 5.0, family  # ~ln(259) at initialisation
        assert last < first - 1.5, (family, first, last)
        assert result.step == 30 and result.loss == pytest.approx(last)
        assert recorder.statuses == ["FINISHED"]
        # The learning rate reported is the one the step used: the schedule at step - 1.
        lrs = [recorder.logs[s]["learning_rate"] for s in (1, 3, 6, 20)]
        schedule = keras_schedule if family == "keras" else optax_schedule
        expected = [float(schedule(s - 1)) for s in (1, 3, 6, 20)]
        np.testing.assert_allclose(lrs, expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_keras_sgd_and_optax_sgd_apply_identical_updates(make_model, stdlib_data, momentum):
    keras_sgd = Trainer(
        make_model(),
        keras.optimizers.SGD(0.05, momentum=momentum),
        stdlib_data,
        steps=5,
        tracking=False,
    )
    keras_sgd.train()
    optax_sgd = Trainer(
        make_model(),
        optax.sgd(0.05, momentum=momentum or None),
        stdlib_data,
        steps=5,
        tracking=False,
    )
    optax_sgd.train()
    trained = params_of(keras_sgd)
    initial = {v.path: np.asarray(v) for v in make_model().trainable_variables}
    assert any(not np.allclose(trained[k], initial[k]) for k in trained)
    assert_params_close(trained, params_of(optax_sgd))


def test_model_holds_trained_weights_after_train(make_model, stdlib_data):
    model = make_model()
    before = [np.array(w) for w in model.get_weights()]
    trainer = Trainer(model, optax.adam(1e-3), stdlib_data, steps=3, tracking=False)
    trainer.train()
    after = model.get_weights()
    assert any(not np.allclose(a, b) for a, b in zip(before, after))
    for var in model.trainable_variables:
        np.testing.assert_array_equal(np.asarray(var), np.asarray(trainer.state.params[var.path]))


def keras_variables(trainer):
    """The model's variables and, for a Keras optimizer, the optimizer's."""
    optimizer = trainer.adapter.optimizer
    return [*trainer.model.variables, *getattr(optimizer, "variables", [])]


class DeviceCopies(Callback):
    """Counts, at each step, the Keras variables whose value is a live device array."""

    def __init__(self, fail_at=None):
        self.variables, self.fail_at, self.on_device = [], fail_at, {}

    def on_step(self, record):
        live = {id(a) for a in jax.live_arrays()}
        self.on_device[record.step] = sum(id(v._value) in live for v in self.variables)
        if record.step == self.fail_at:
            raise RuntimeError("callback failure")


@pytest.mark.parametrize("family", ["keras", "optax"])
def test_keras_objects_keep_no_device_copy_while_training(make_model, stdlib_data, family):
    model = make_model()
    optimizer = keras.optimizers.AdamW(1e-3) if family == "keras" else optax.adamw(1e-3)
    probe = DeviceCopies()
    trainer = Trainer(model, optimizer, stdlib_data, steps=4, tracking=False, callbacks=[probe])
    variables = probe.variables = keras_variables(trainer)
    trainer.train()
    assert probe.on_device == {1: 0, 2: 0, 3: 0, 4: 0}
    # Afterwards every variable is a device array again, holding the trained values.
    assert all(isinstance(v._value, jax.Array) for v in variables)
    for var in model.trainable_variables:
        np.testing.assert_array_equal(np.asarray(var), np.asarray(trainer.state.params[var.path]))
    if family == "keras":
        trained_slots = trainer.adapter.optimizer.variables
        assert any(np.abs(np.asarray(v)).sum() > 0 for v in trained_slots if "momentum" in v.path)


def test_a_failed_run_leaves_the_keras_objects_as_they_were(make_model, stdlib_data):
    model = make_model()
    optimizer = keras.optimizers.AdamW(1e-3)
    before = [np.array(w) for w in model.get_weights()]
    probe = DeviceCopies(fail_at=3)
    trainer = Trainer(model, optimizer, stdlib_data, steps=6, tracking=False, callbacks=[probe])
    variables = probe.variables = keras_variables(trainer)
    slots_before = [np.array(v) for v in variables]
    with pytest.raises(RuntimeError, match="callback failure"):
        trainer.train()
    assert all(isinstance(v._value, jax.Array) for v in variables)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, v in zip(slots_before, variables):
        np.testing.assert_array_equal(a, np.asarray(v))
    # The model still works, on the devices, after the failure.
    logits = model(np.zeros((1, SEQ_LEN), dtype="int32"))
    assert np.isfinite(np.asarray(logits)).all()


def test_fsdp_on_eight_devices_shards_params_and_state_and_matches_one_device(
    make_model, stdlib_data, eight_devices
):
    steps = 20
    # A larger eps keeps Adam from amplifying reduction-order noise in near-zero gradients
    # (g / sqrt(v) ~ +-1 whatever g's size), so what is compared is the sharding alone.
    optimizer = optax.adamw(1e-3, eps=1e-4)
    reference = Trainer(
        make_model(), optimizer, stdlib_data, steps=steps, devices=eight_devices[:1], tracking=False
    )
    reference.train()
    for sharding in ("dp", "fsdp"):
        trainer = Trainer(
            make_model(), optimizer, stdlib_data, steps=steps, sharding=sharding, tracking=False
        )
        trainer.train()
        assert dict(trainer.mesh.shape) == (
            {"data": 8, "fsdp": 1} if sharding == "dp" else {"data": 1, "fsdp": 8}
        )
        adam_state = trainer.state.opt_state[0]
        for key, param in trainer.state.params.items():
            big = param.size >= trainer.config.min_shard_size
            if sharding == "fsdp" and big:
                assert not param.sharding.is_fully_replicated, key
                assert adam_state.mu[key].sharding == param.sharding, key
                assert adam_state.nu[key].sharding == param.sharding, key
                shard_shape = param.addressable_shards[0].data.shape
                assert math.prod(shard_shape) == param.size // 8, key
            else:
                assert param.sharding.is_fully_replicated, key
        assert_params_close(params_of(trainer), params_of(reference), rtol=1e-4, atol=1e-5)


def test_fsdp_shards_keras_optimizer_slots_like_their_parameters(
    make_model, stdlib_data, eight_devices
):
    trainer = Trainer(
        make_model(),
        keras.optimizers.Adam(1e-3),
        stdlib_data,
        steps=2,
        sharding="fsdp",
        tracking=False,
    )
    trainer.train()
    kernel = "causal_lm/block_0/mlp/gate/kernel"
    assert not trainer.state.params[kernel].sharding.is_fully_replicated
    for slot in ("momentum", "velocity"):
        key = next(
            k for k in trainer.state.opt_state if k.endswith(f"block_0_mlp_gate_kernel_{slot}")
        )
        assert trainer.state.opt_state[key].sharding == trainer.state.params[kernel].sharding
    iteration = next(k for k in trainer.state.opt_state if k.endswith("iteration"))
    assert int(trainer.state.opt_state[iteration]) == 2


def test_gradient_accumulation_matches_one_big_batch(make_model, stdlib_data):
    two = jax.devices()[:2]  # 8 rows = 2 devices x 4 micro-batches of 1 row each
    whole = Trainer(make_model(), optax.sgd(0.1), stdlib_data, steps=3, devices=two, tracking=False)
    whole.train()
    accumulated = Trainer(
        make_model(),
        optax.sgd(0.1),
        stdlib_data,
        steps=3,
        grad_accum_steps=4,
        devices=two,
        tracking=False,
    )
    accumulated.train()
    assert_params_close(params_of(whole), params_of(accumulated), rtol=1e-4, atol=1e-6)


def test_mixed_bfloat16_keeps_float32_master_weights(make_model, stdlib_data):
    model = make_model(dtype="mixed_bfloat16")
    recorder = Recorder()
    trainer = Trainer(
        model,
        optax.adam(3e-3),
        stdlib_data,
        steps=20,
        log_every=1,
        callbacks=[recorder],
        precision="mixed_bfloat16",
        tracking=False,
    )
    trainer.train()
    assert all(p.dtype == np.float32 for p in trainer.state.params.values())
    assert all(m.dtype == np.float32 for m in trainer.state.opt_state[0].mu.values())
    assert recorder.logs[20]["loss"] < recorder.logs[1]["loss"] - 1.0


def test_eval_reports_loss_and_perplexity_and_compiles_each_step_once(
    make_model, stdlib_documents, stdlib_data
):
    eval_data = data.load(
        stdlib_documents[:20], seq_len=SEQ_LEN, batch_size=BATCH, shuffle=False, repeat=False
    )
    recorder = Recorder()
    trainer = Trainer(
        make_model(),
        optax.adam(1e-3),
        stdlib_data,
        eval_data=eval_data,
        steps=6,
        eval_every=2,
        eval_steps=3,
        callbacks=[recorder],
        tracking=False,
    )
    result = trainer.train()
    assert sorted(recorder.evals) == [2, 4, 6]
    for metrics in recorder.evals.values():
        assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert recorder.evals[6]["eval_loss"] < recorder.evals[2]["eval_loss"]
    assert result.eval_loss == recorder.evals[6]["eval_loss"]
    assert trainer.steps.train_step._cache_size() == 1
    assert trainer.steps.eval_step._cache_size() == 1


def test_dropout_randomness_comes_from_the_seed(make_model, stdlib_data):
    def train(seed):
        t = Trainer(
            make_model(dropout=0.2),
            optax.adam(1e-3),
            stdlib_data,
            steps=3,
            seed=seed,
            tracking=False,
        )
        t.train()
        return params_of(t)

    first, again, other = train(0), train(0), train(1)
    assert_params_close(first, again, rtol=0, atol=0)
    assert any(not np.allclose(first[k], other[k]) for k in first)


def test_multisteps_and_inject_hyperparams_are_accepted(make_model, stdlib_data):
    recorder = Recorder()
    trainer = Trainer(
        make_model(),
        optax.MultiSteps(optax.adam(1e-3), every_k_schedule=2),
        stdlib_data,
        steps=2,
        log_every=1,
        tracking=False,
    )
    start = {v.path: np.asarray(v) for v in trainer.model.trainable_variables}
    trainer.train()
    assert not np.allclose(
        params_of(trainer)["causal_lm/lm_head/kernel"], start["causal_lm/lm_head/kernel"]
    )
    injected = optax.inject_hyperparams(optax.adamw)(learning_rate=2e-3)
    Trainer(
        make_model(),
        injected,
        stdlib_data,
        steps=2,
        log_every=1,
        callbacks=[recorder],
        tracking=False,
    ).train()
    assert recorder.logs[2]["learning_rate"] == pytest.approx(2e-3)


def test_plain_iterables_of_batches_and_epochs(make_model, stdlib_data):
    batches = list(itertools.islice(iter(stdlib_data), 3))
    trainer = Trainer(make_model(), optax.adam(1e-3), batches, epochs=2, tracking=False)
    assert trainer.total_steps() == 6
    assert trainer.train().step == 6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer": 42}, "got builtins.int"),
        ({"optimizer": "adamw"}, "got builtins.str"),
        ({"train_data": [{"x": np.zeros((4, SEQ_LEN), np.int32)}] * 2}, "'x' and 'y'"),
        (
            {"train_data": [{"x": np.zeros((12, SEQ_LEN)), "y": np.zeros((12, SEQ_LEN))}]},
            "batch size 12",
        ),
        ({"train_data": iter([]), "steps": None, "epochs": 1}, "steps=N"),
    ],
)
def test_bad_input_raises_a_clear_config_error(
    make_model, stdlib_data, kwargs, message, eight_devices
):
    # On 8 devices: a batch of 12 rows does not split over them.
    args = {"optimizer": optax.adam(1e-3), "train_data": stdlib_data, "steps": 2, **kwargs}
    with pytest.raises(ConfigError, match=message):
        Trainer(make_model(), args.pop("optimizer"), args.pop("train_data"), **args).train()


def test_batch_not_divisible_by_devices_names_the_sizes(make_model, eight_devices):
    small = data.load("synthetic", seq_len=SEQ_LEN, batch_size=6)
    with pytest.raises(ConfigError, match=r"batch size 6 is not divisible by the 8"):
        Trainer(make_model(), optax.adam(1e-3), small, steps=1, tracking=False).train()
    assert jax.device_count() == 8


class _SignalsDuringEval:
    """Endless eval batches that send ``signum`` to this process at the third batch read."""

    def __init__(self, batch, signum):
        self.batch, self.signum, self.read = batch, signum, 0

    def __iter__(self):
        import os

        while True:
            self.read += 1
            if self.read == 3:
                os.kill(os.getpid(), self.signum)
            assert self.read < 50, "the evaluation went on after the signal"
            yield self.batch


def test_endless_eval_data_is_refused_and_a_signal_ends_an_evaluation(
    make_model, stdlib_documents, stdlib_data
):
    import signal

    from kithara_ops import TrainingStopped

    repeating = data.load(stdlib_documents[:20], seq_len=SEQ_LEN, batch_size=BATCH)
    with pytest.raises(ConfigError, match=r"repeats forever.*repeat=False.*or set eval_steps"):
        Trainer(make_model(), optax.adam(1e-3), stdlib_data, eval_data=repeating, steps=2)
    bounded = Trainer(
        make_model(), optax.adam(1e-3), stdlib_data, eval_data=repeating, eval_steps=2,
        steps=2, tracking=False, callbacks=[recorder := Recorder()],
    )  # fmt: skip
    assert bounded.train().eval_loss == recorder.evals[2]["eval_loss"]

    endless = _SignalsDuringEval(next(iter(stdlib_data)), signal.SIGTERM)
    recorder = Recorder()
    trainer = Trainer(
        make_model(), optax.adam(1e-3), stdlib_data, eval_data=endless, steps=4, eval_every=2,
        tracking=False, callbacks=[recorder],
    )  # fmt: skip
    with pytest.raises(TrainingStopped) as stopped:
        trainer.train()
    assert (stopped.value.signum, stopped.value.step) == (signal.SIGTERM, 2)
    assert endless.read == 3 and recorder.evals == {} and recorder.statuses == ["KILLED"]
