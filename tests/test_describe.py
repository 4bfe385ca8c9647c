"""``describe_optimizer``: one description, with the same fields, for Keras and Optax."""

import json

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest

from kithara_ops.errors import ConfigError
from kithara_ops.optim.describe import describe_optimizer, optimizer_label, optimizer_params

KERAS_CASES = [  # class, its own kwargs, name, hyperparams expected under the shared names
    (
        keras.optimizers.AdamW,
        {"weight_decay": 0.01, "beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-6},
        "adamw",
        {"b1": 0.8, "b2": 0.99, "eps": 1e-6, "weight_decay": 0.01},
    ),
    (keras.optimizers.Adam, {}, "adam", {"b1": 0.9, "b2": 0.999, "eps": 1e-7}),
    (
        keras.optimizers.SGD,
        {"momentum": 0.9, "nesterov": True},
        "sgd",
        {"momentum": 0.9, "nesterov": True},
    ),
    (keras.optimizers.Lion, {"beta_1": 0.95, "beta_2": 0.98}, "lion", {"b1": 0.95, "b2": 0.98}),
]
WARMUP_COSINE = "warmup_cosine(init=0.0, peak=0.001, warmup_steps=50, decay_steps=1000, end=0.0)"


def describe(opt):
    """The description, checked to be JSON-serialisable."""
    description = describe_optimizer(opt)
    json.dumps(description, allow_nan=False)
    return description


def user_chain():
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 50, 1000)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))


# -- Keras ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "kwargs", "name", "hyperparams"), KERAS_CASES)
def test_keras_constant_learning_rate_with_clipnorm(cls, kwargs, name, hyperparams):
    d = describe(cls(learning_rate=3e-4, clipnorm=0.5, **kwargs))
    assert (d["family"], d["name"], d["learning_rate"]) == ("keras", name, 3e-4)
    assert d["learning_rate_schedule"] is None
    assert d["hyperparams"] == hyperparams
    assert d["clipping"] == {"kind": "norm", "value": 0.5}
    assert d["chain"] == [
        {"name": "clip_by_norm", "hyperparams": {"max_norm": 0.5}},
        {"name": name, "hyperparams": hyperparams, "learning_rate": 3e-4},
    ]
    assert d["chain_text"].startswith(f"clip_by_norm(max_norm=0.5) -> {name}(learning_rate=0.0003")
    assert d["label"] == f"keras:clip+{name} lr=3e-4"
    assert (d["injected"], d["multi_steps"]) == (False, False)
    assert d["tree"]["class_name"] == cls.__name__
    assert d["config"]["clipnorm"] == 0.5


@pytest.mark.parametrize(("cls", "kwargs", "name", "hyperparams"), KERAS_CASES)
def test_keras_schedule_with_global_clipnorm(cls, kwargs, name, hyperparams):
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=100, alpha=0.0, warmup_target=1e-3, warmup_steps=5
    )
    d = describe(cls(learning_rate=schedule, global_clipnorm=1.0, **kwargs))
    assert d["learning_rate"] == (
        "cosine_decay(initial_learning_rate=0.0, decay_steps=100, alpha=0.0, "
        "warmup_target=0.001, warmup_steps=5)"
    )
    assert d["learning_rate_schedule"] == {
        "kind": "cosine_decay",
        "initial_learning_rate": 0.0,
        "decay_steps": 100,
        "alpha": 0.0,
        "warmup_target": 0.001,
        "warmup_steps": 5,
    }
    assert d["hyperparams"] == hyperparams
    assert d["clipping"] == {"kind": "global_norm", "value": 1.0}
    assert [e["name"] for e in d["chain"]] == ["clip_by_global_norm", name]
    assert d["chain"][0]["hyperparams"] == {"max_norm": 1.0}
    assert d["chain"][1]["learning_rate"] == d["learning_rate"]
    assert d["label"] == f"keras:clip+{name} lr=cosine_decay(1e-3)"


def test_keras_clipvalue_defaults_and_bookkeeping():
    d = describe(keras.optimizers.SGD(0.1, clipvalue=0.3))
    assert d["hyperparams"] == {"momentum": 0.0, "nesterov": False}
    assert d["clipping"] == {"kind": "value", "value": 0.3}
    assert (
        d["chain_text"]
        == "clip(max_delta=0.3) -> sgd(learning_rate=0.1, momentum=0.0, nesterov=False)"
    )
    plain = describe(keras.optimizers.AdamW(1e-3))
    assert plain["chain"] == [
        {"name": "adamw", "hyperparams": plain["hyperparams"], "learning_rate": 0.001}
    ]
    assert plain["clipping"] is None and plain["label"] == "keras:adamw lr=1e-3"
    ema = describe(keras.optimizers.Adam(1e-3, use_ema=True, ema_momentum=0.95))
    assert ema["hyperparams"]["use_ema"] is True and ema["hyperparams"]["ema_momentum"] == 0.95


def test_keras_learning_rate_keras_cannot_serialise():
    d = describe(keras.optimizers.Adam(lambda: 0.001, beta_1=0.8))
    assert d["name"] == "adam" and d["hyperparams"]["b1"] == 0.8
    assert d["learning_rate"].endswith("<lambda>()")


def test_keras_describe_has_no_side_effects():
    opt = keras.optimizers.AdamW(1e-3, weight_decay=0.01, global_clipnorm=1.0)
    config = opt.get_config()
    describe(opt)
    assert opt.built is False
    assert opt.get_config() == config


# -- Optax aliases -------------------------------------------------------------------------


def test_optax_adamw():
    d = describe(optax.adamw(1e-3, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.05))
    hyperparams = {"b1": 0.8, "b2": 0.95, "eps": 1e-6, "weight_decay": 0.05}
    assert (d["family"], d["name"], d["learning_rate"]) == ("optax", "adamw", 1e-3)
    assert d["hyperparams"] == hyperparams and d["clipping"] is None
    assert d["chain"] == [{"name": "adamw", "hyperparams": hyperparams, "learning_rate": 1e-3}]
    assert (
        d["chain_text"]
        == "adamw(learning_rate=0.001, b1=0.8, b2=0.95, eps=1e-06, weight_decay=0.05)"
    )
    assert d["label"] == "optax:adamw lr=1e-3"
    assert d["tree"]["name"] == "chain"
    assert [c["name"] for c in d["tree"]["children"]] == [
        "scale_by_adam",
        "add_decayed_weights",
        "scale",
    ]


@pytest.mark.parametrize(
    ("tx", "name", "lr", "hyperparams"),
    [
        (optax.adam(2e-4), "adam", 2e-4, {"b1": 0.9, "b2": 0.999, "eps": 1e-8}),
        (optax.sgd(0.1), "sgd", 0.1, {"momentum": 0.0, "nesterov": False}),
        (optax.sgd(0.1, momentum=0.9), "sgd", 0.1, {"momentum": 0.9, "nesterov": False}),
        (optax.sgd(0.1, 0.9, nesterov=True), "sgd", 0.1, {"momentum": 0.9, "nesterov": True}),
        (optax.nadam(1e-3), "nadam", 1e-3, {"b1": 0.9, "b2": 0.999, "eps": 1e-8}),
        (optax.adamax(1e-3, b1=0.8), "adamax", 1e-3, {"b1": 0.8, "b2": 0.999, "eps": 1e-8}),
        (optax.lamb(1e-3, weight_decay=0.1), "lamb", 1e-3, None),
        (optax.nadamw(1e-3, weight_decay=0.1), "nadamw", 1e-3, None),
        (optax.rmsprop(1e-3, decay=0.95), "rmsprop", 1e-3, None),
        (optax.adagrad(1e-2), "adagrad", 1e-2, None),
        (optax.adabelief(1e-3), "adabelief", 1e-3, None),
        (optax.amsgrad(1e-3), "amsgrad", 1e-3, None),
        (optax.yogi(1e-3), "yogi", 1e-3, None),
    ],
)
def test_optax_aliases_by_structure(tx, name, lr, hyperparams):
    d = describe(tx)
    assert (d["name"], d["learning_rate"], d["clipping"]) == (name, lr, None)
    assert [e["name"] for e in d["chain"]] == [name]
    if hyperparams is not None:
        assert d["hyperparams"] == hyperparams
    if name == "lamb" or name == "nadamw":
        assert d["hyperparams"]["weight_decay"] == 0.1
    if name == "rmsprop":
        assert d["hyperparams"]["decay"] == 0.95


def test_optax_lion():
    d = describe(optax.lion(1e-4, b1=0.95, b2=0.98, weight_decay=0.1))
    assert (d["name"], d["learning_rate"]) == ("lion", 1e-4)
    assert {k: d["hyperparams"][k] for k in ("b1", "b2", "weight_decay")} == {
        "b1": 0.95,
        "b2": 0.98,
        "weight_decay": 0.1,
    }
    assert d["label"] == "optax:lion lr=1e-4"


def test_optax_adafactor_keeps_its_own_clip_and_sign():
    # adafactor is [..., clip_by_block_rms, scale(lr), ..., scale(-1)]: lr 1e-3, not -1.
    d = describe(optax.adafactor(1e-3, decay_rate=0.7))
    assert (d["name"], d["learning_rate"], d["clipping"]) == ("adafactor", 1e-3, None)
    assert d["hyperparams"]["decay_rate"] == 0.7
    assert d["hyperparams"]["clipping_threshold"] == 1.0
    assert [e["name"] for e in d["chain"]] == ["adafactor"]
    user_clipped = describe(optax.chain(optax.clip_by_block_rms(2.0), optax.adafactor(1e-3)))
    assert user_clipped["clipping"] == {"kind": "block_rms", "value": 2.0}
    assert [e["name"] for e in user_clipped["chain"]] == ["clip_by_block_rms", "adafactor"]


# -- Optax chains, schedules, wrappers ------------------------------------------------------


def test_optax_user_chain_with_clip_and_warmup_cosine():
    d = describe(user_chain())
    assert (d["family"], d["name"]) == ("optax", "adamw")
    assert d["learning_rate"] == WARMUP_COSINE
    assert d["learning_rate_schedule"] == {
        "kind": "warmup_cosine",
        "init": 0.0,
        "peak": 0.001,
        "warmup_steps": 50,
        "decay_steps": 1000,
        "end": 0.0,
    }
    hyperparams = {"b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.01}
    assert d["hyperparams"] == hyperparams
    assert d["clipping"] == {"kind": "global_norm", "value": 1.0}
    assert d["chain"] == [
        {"name": "clip_by_global_norm", "hyperparams": {"max_norm": 1.0}},
        {"name": "adamw", "hyperparams": hyperparams, "learning_rate": WARMUP_COSINE},
    ]
    assert d["chain_text"] == (
        f"clip_by_global_norm(max_norm=1.0) -> adamw(learning_rate={WARMUP_COSINE}, "
        "b1=0.9, b2=0.999, eps=1e-08, weight_decay=0.01)"
    )
    assert d["label"] == "optax:clip+adamw lr=warmup_cosine(1e-3)"
    assert len(d["label"]) <= 40


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        (
            optax.warmup_cosine_decay_schedule(1e-5, 3e-4, 10, 500, end_value=3e-6, exponent=2.0),
            {"kind": "warmup_cosine", "init": 1e-5, "peak": 3e-4, "warmup_steps": 10,
             "decay_steps": 500, "end": 3e-6, "exponent": 2.0},
        ),
        (
            optax.cosine_decay_schedule(1e-3, 200, alpha=0.1),
            {"kind": "cosine_decay", "init_value": 1e-3, "decay_steps": 200, "alpha": 0.1,
             "exponent": 1.0},
        ),
        (
            optax.exponential_decay(1e-3, 100, 0.9, transition_begin=10, staircase=True),
            {"kind": "exponential_decay", "init_value": 1e-3, "transition_steps": 100,
             "decay_rate": 0.9, "transition_begin": 10, "staircase": True, "end_value": None},
        ),
        (
            optax.linear_schedule(1e-3, 0.0, 100, 5),
            {"kind": "linear", "init_value": 1e-3, "end_value": 0.0, "transition_steps": 100,
             "transition_begin": 5},
        ),
        (
            optax.polynomial_schedule(1e-3, 0.0, 2, 100),
            {"kind": "polynomial", "init_value": 1e-3, "end_value": 0.0, "transition_steps": 100,
             "transition_begin": 0, "power": 2},
        ),
        (optax.constant_schedule(1e-3), {"kind": "constant", "value": 1e-3}),
        (
            optax.piecewise_constant_schedule(1e-3, {100: 0.1}),
            {"kind": "piecewise_constant", "init_value": 1e-3, "boundaries_and_scales": {100: 0.1}},
        ),
        (
            optax.warmup_exponential_decay_schedule(0.0, 1e-3, 10, 100, 0.9),
            {"kind": "warmup_exponential_decay", "init": 0.0, "peak": 1e-3, "warmup_steps": 10,
             "transition_steps": 100, "decay_rate": 0.9, "transition_begin": 0,
             "staircase": False, "end": None},
        ),
    ],
)  # fmt: skip
def test_optax_schedules(schedule, expected):
    d = describe(optax.adam(schedule))
    assert d["learning_rate_schedule"] == expected
    assert d["learning_rate"].startswith(expected["kind"] + "(")
    assert d["label"].startswith("optax:adam lr=")


def test_unrecognised_schedule_falls_back_to_its_name():
    d = describe(optax.sgd(lambda step: 0.1))
    assert d["name"] == "sgd"
    assert (
        d["learning_rate"]
        == "test_unrecognised_schedule_falls_back_to_its_name.<locals>.<lambda>()"
    )


def test_optax_inject_hyperparams():
    d = describe(optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, weight_decay=0.1))
    assert (d["name"], d["learning_rate"], d["injected"]) == ("adamw", 1e-3, True)
    assert d["hyperparams"] == {"b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.1}
    assert d["chain"][0]["injected"] is True
    scheduled = optax.inject_hyperparams(optax.sgd)(
        learning_rate=optax.cosine_decay_schedule(0.1, 100), momentum=0.9
    )
    d = describe(scheduled)
    assert (d["name"], d["hyperparams"]) == ("sgd", {"momentum": 0.9, "nesterov": False})
    assert d["learning_rate_schedule"]["kind"] == "cosine_decay"
    assert d["learning_rate_schedule"]["init_value"] == 0.1


def test_optax_nested_chain_of_primitives():
    tx = optax.chain(optax.chain(optax.clip(0.5), optax.scale_by_adam()), optax.scale(-1e-3))
    d = describe(tx)
    assert (d["name"], d["learning_rate"]) == ("adam", 1e-3)
    assert d["hyperparams"] == {"b1": 0.9, "b2": 0.999, "eps": 1e-8}
    assert d["clipping"] == {"kind": "value", "value": 0.5}
    assert [e["name"] for e in d["chain"]] == ["clip", "scale_by_adam", "scale"]
    assert d["chain"][2]["hyperparams"] == {"step_size": -1e-3}
    assert d["chain_text"].startswith("clip(max_delta=0.5) -> scale_by_adam(b1=0.9")


def test_optax_custom_transformation_is_unknown():
    factor = 0.5

    def init_fn(params):
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        return jax.tree.map(lambda u: -factor * u, updates), state

    d = describe(optax.GradientTransformation(init_fn, update_fn))
    assert (d["family"], d["name"], d["learning_rate"]) == ("optax", "unknown", None)
    assert d["hyperparams"] == {"factor": 0.5}
    assert d["label"] == "optax:unknown"


@pytest.mark.parametrize("as_transformation", [False, True])
def test_optax_multi_steps(as_transformation):
    multi = optax.MultiSteps(optax.adamw(1e-3, weight_decay=0.01), every_k_schedule=4)
    d = describe(multi.gradient_transformation() if as_transformation else multi)
    assert (d["name"], d["learning_rate"], d["multi_steps"]) == ("adamw", 1e-3, True)
    assert d["hyperparams"]["every_k_schedule"] == 4
    assert d["hyperparams"]["weight_decay"] == 0.01
    assert "every_k_schedule" not in d["chain"][0]["hyperparams"]
    assert d["label"] == "optax:adamw lr=1e-3 k=4"


def test_numpy_and_jax_values_are_json_safe():
    d = describe(optax.adamw(jnp.asarray(1e-3), b1=np.float32(0.5), mu_dtype=jnp.bfloat16))
    assert d["learning_rate"] == pytest.approx(1e-3)
    assert d["hyperparams"]["b1"] == 0.5 and d["hyperparams"]["mu_dtype"] == "bfloat16"


def test_optax_describe_has_no_side_effects():
    tx = user_chain()
    init, update = tx.init, tx.update
    params = {"w": jnp.ones((3,)), "b": jnp.zeros((2,))}
    before = tx.init(params)
    describe(tx)
    after = tx.init(params)
    assert tx.init is init and tx.update is update
    assert jax.tree.structure(before) == jax.tree.structure(after)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), before, after)))
    assert "InjectHyperparamsState" not in repr(jax.tree.structure(after))


# -- Flat params and errors ----------------------------------------------------------------


def test_params_have_the_same_keys_for_both_families():
    keras_params = optimizer_params(
        describe(keras.optimizers.AdamW(1e-3, weight_decay=0.01, global_clipnorm=1.0))
    )
    optax_params = optimizer_params(
        describe(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.01)))
    )
    assert set(keras_params) == set(optax_params) == {
        "optimizer.family", "optimizer.name", "optimizer.learning_rate", "optimizer.b1",
        "optimizer.b2", "optimizer.eps", "optimizer.weight_decay", "optimizer.clipping",
        "optimizer.chain", "optimizer.chain.0", "optimizer.chain.1",
    }  # fmt: skip
    for key in ("name", "learning_rate", "b1", "b2", "weight_decay", "clipping", "chain.0"):
        assert keras_params[f"optimizer.{key}"] == optax_params[f"optimizer.{key}"], key
    assert keras_params["optimizer.learning_rate"] == "0.001"
    assert keras_params["optimizer.clipping"] == "global_norm=1.0"
    assert keras_params["optimizer.eps"] == "1e-07" and optax_params["optimizer.eps"] == "1e-08"
    assert (keras_params["optimizer.family"], optax_params["optimizer.family"]) == (
        "keras",
        "optax",
    )
    assert all(isinstance(v, str) for v in {**keras_params, **optax_params}.values())


def test_params_no_clipping_and_long_values_shortened():
    params = optimizer_params(describe(optax.adam(1e-3)))
    assert params["optimizer.clipping"] == "none"
    full = optimizer_params(describe(user_chain()))
    short = optimizer_params(describe(user_chain()), max_len=40)
    assert set(short) == set(full)
    for key, value in short.items():
        assert len(value) <= 40
        if len(full[key]) > 40:
            assert value.endswith("...") and full[key].startswith(value[:-3])
        else:
            assert value == full[key]
    assert short["optimizer.chain"].endswith("...")


def test_optimizer_label():
    assert optimizer_label(keras.optimizers.AdamW(1e-3)) == "keras:adamw lr=1e-3"
    assert optimizer_label(user_chain()) == "optax:clip+adamw lr=warmup_cosine(1e-3)"


@pytest.mark.parametrize("bad", [object(), "adamw", None, keras.optimizers.schedules.CosineDecay])
def test_other_objects_are_refused(bad):
    with pytest.raises(ConfigError, match=type(bad).__qualname__):
        describe_optimizer(bad)


# --------------------------------------------------------------------------- named by factory


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: optax.optimistic_adam(1e-2), "optimistic_adam"),
        (lambda: optax.optimistic_adam_v2(1e-2), "optimistic_adam_v2"),
        (lambda: optax.sign_sgd(1e-2), "sign_sgd"),
        (lambda: optax.signum(1e-2), "signum"),
        (lambda: optax.nadam(1e-2), "nadam"),
        (lambda: optax.contrib.schedule_free_adamw(1e-2), "schedule_free_adamw"),
        (lambda: optax.contrib.schedule_free_sgd(1e-2), "schedule_free_sgd"),
        (lambda: optax.contrib.prodigy(), "prodigy"),
        (lambda: optax.contrib.dadapt_adamw(), "dadapt_adamw"),
        (lambda: optax.contrib.cocob(), "cocob"),
        (lambda: optax.contrib.adopt(1e-2), "adopt"),
        (lambda: optax.contrib.galore(1e-2), "galore"),
        (lambda: optax.contrib.mechanize(optax.sgd(1e-2)), "mechanize_sgd"),
        (lambda: optax.optimistic_gradient_descent(1e-2), "optimistic_gradient_descent"),
        # named after the optimizer that steps, not the adversarial one
        (lambda: optax.contrib.sam(optax.adam(1e-2), optax.sgd(2e-2)), "sam_adam"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_optax_optimizers_are_named_by_their_factory(make, name):
    assert describe_optimizer(make())["name"] == name


@pytest.mark.parametrize(
    ("make", "base"),
    [
        (lambda: optax.contrib.prodigy(), 1.0),
        (lambda: optax.contrib.dadapt_adamw(learning_rate=0.5), 0.5),
        (lambda: optax.contrib.cocob(learning_rate=2.0), 2.0),
        (lambda: optax.polyak_sgd(max_learning_rate=0.3), 0.3),
        (lambda: optax.polyak_sgd(max_learning_rate=0.3, scaling=2.0), 0.3),  # a multiplier
        (lambda: optax.optimistic_adam(0.02), 0.02),
    ],
)
def test_learning_rate_free_methods_report_their_configured_base(make, base):
    from kithara_ops.optim.optax_adapter import OptaxAdapter

    tx = make()
    assert describe_optimizer(tx)["learning_rate"] == base
    params = {"w": jnp.ones((3,))}
    adapter = OptaxAdapter(tx)
    _, _, used = adapter.update(params, adapter.init(params), params, jnp.float32(1.0))
    assert float(used) == pytest.approx(base)


def test_loss_scale_optimizer_is_its_inner_optimizer_with_no_session_names():
    first = describe_optimizer(keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-2)))
    again = describe_optimizer(keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-2)))
    assert first == again
    assert (first["name"], first["learning_rate"], first["hyperparams"]["b1"]) == (
        "adam",
        0.01,
        0.9,
    )
    assert first["chain_text"].startswith("loss_scale(initial_scale=32768.0")
    assert "adam_" not in json.dumps(first)


@pytest.mark.parametrize(
    ("schedule", "kind", "fields"),
    [
        (lambda: optax.cosine_onecycle_schedule(100, 1e-2), "cosine_onecycle",
         {"transition_steps": 100, "peak_value": 0.01, "pct_start": 0.3, "div_factor": 25.0}),
        (lambda: optax.linear_onecycle_schedule(200, 1e-3, pct_final=0.9), "linear_onecycle",
         {"transition_steps": 200, "peak_value": 0.001, "pct_final": 0.9}),
        (lambda: optax.sgdr_schedule([{"init_value": 0.0, "peak_value": 0.01, "warmup_steps": 5,
                                       "decay_steps": 20, "end_value": 0.0}] * 2), "sgdr", {}),
    ],
    ids=["cosine_onecycle", "linear_onecycle", "sgdr"],
)  # fmt: skip
def test_schedules_are_described_by_their_constructor(schedule, kind, fields):
    described = describe_optimizer(optax.adam(schedule()))["learning_rate_schedule"]
    assert described["kind"] == kind
    assert {k: described[k] for k in fields} == fields


@pytest.mark.parametrize(
    "make",
    [
        lambda: optax.cosine_decay_schedule(1e-2, 20),
        lambda: optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 20),
        lambda: optax.sgdr_schedule([{"init_value": 0.0, "peak_value": 0.01, "warmup_steps": 2,
                                      "decay_steps": 20}] * 2),
    ],
    ids=["cosine", "warmup_cosine", "sgdr"],
)  # fmt: skip
def test_a_called_cosine_schedule_keeps_its_whole_decay_steps(make):
    schedule = make()
    before = describe_optimizer(optax.adam(schedule))
    for step in (3, 30):  # Optax turns decay_steps into a float on the first call
        schedule(step)
    assert describe_optimizer(optax.adam(schedule)) == before
    assert "decay_steps: 20," in before["learning_rate"].replace("=", ": "), before["learning_rate"]


def test_a_multi_transform_is_named_and_logged_after_its_first_transform():
    from kithara_ops.optim.optax_adapter import OptaxAdapter

    tx = optax.multi_transform({"a": optax.adam(0.01), "s": optax.sgd(0.5)}, {"w": "a", "b": "s"})
    described = describe_optimizer(tx)
    params = {"w": jnp.ones((3,)), "b": jnp.ones((2,))}
    adapter = OptaxAdapter(tx)
    _, _, used = adapter.update(params, adapter.init(params), params, jnp.float32(1.0))
    assert (described["name"], described["learning_rate"]) == ("adam", 0.01)
    assert float(used) == pytest.approx(0.01)  # the step metric: the same transform's rate


@pytest.mark.parametrize(
    "labels", [{"w": "a", "b": "sgd"}, {"w": "a", "b": {"inner": "sgd"}}], ids=["flat", "nested"]
)
def test_a_multi_transform_label_naming_no_transform_is_refused_in_one_line(labels):
    tx = optax.multi_transform({"a": optax.adam(0.01), "s": optax.sgd(0.5)}, labels)
    with pytest.raises(ConfigError) as refused:
        describe_optimizer(tx)
    message = str(refused.value)
    assert "\n" not in message
    assert "label 'sgd' names no transform; the transforms are 'a', 's'" in message


def multi_optimizer():
    decay = keras.optimizers.schedules.ExponentialDecay(0.02, decay_steps=1, decay_rate=0.5)
    groups = keras.optimizers.OptimizerMap(default_optimizer=keras.optimizers.SGD(0.01, 0.9))
    groups["^emb"] = keras.optimizers.Adam(decay)
    return keras.optimizers.MultiOptimizer(groups)


def test_a_multi_optimizer_describes_each_group_and_logs_each_learning_rate():
    from kithara_ops.optim.keras_adapter import KerasAdapter

    described = describe_optimizer(multi_optimizer())
    assert described["name"] == "multi_optimizer"
    assert described["hyperparams"]["routing"] == {"^emb": 0, "default": 1}
    first, second = described["hyperparams"]["optimizers"]
    assert first.startswith("adam(learning_rate=exponential_decay(") and second.startswith("sgd(")
    assert "learning_rate=0.01" in second and "momentum=0.9" in second
    assert describe_optimizer(multi_optimizer()) == described  # no per-session names
    from kithara_ops.state import variable_keys

    variables = [keras.Variable(np.ones(2), name=n) for n in ("emb", "out")]
    adapter = KerasAdapter(multi_optimizer(), variables)
    params = {k: jnp.ones(2) for k in variable_keys(variables)}
    state, seen = adapter.init(params), []
    step = jax.jit(lambda p, s: (*adapter.update(p, s, p, jnp.float32(0)), adapter.group_learning_rates(s)))  # fmt: skip
    for _ in range(3):
        params, state, used, groups = step(params, state)
        seen.append((float(used), {k: float(v) for k, v in groups.items()}))
    # learning_rate is the first group's (the scheduled Adam), each group's under its index.
    assert [u for u, _ in seen] == pytest.approx([0.02, 0.01, 0.005])
    assert [g["learning_rate.0"] for _, g in seen] == pytest.approx([0.02, 0.01, 0.005])
    assert [g["learning_rate.1"] for _, g in seen] == pytest.approx([0.01] * 3)


def test_a_specs_integer_schedule_fields_print_as_integers():
    from kithara_ops.optim.spec import build_optimizer

    spec = "optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 6, 60))"
    text = optimizer_params(describe_optimizer(build_optimizer(spec, 1e-3, None)))
    assert "warmup_steps=6, decay_steps=60, end=0.0" in text["optimizer.learning_rate"]
