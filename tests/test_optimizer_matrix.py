"""Every optimizer a user can bring, enumerated from the installed Keras and Optax.

The cases are read from the packages at collection time, so a new release's optimizers are
covered without editing this file: every concrete ``keras.optimizers`` class, every alias in
``optax`` (the functions of ``optax._src.alias``) and every public ``optax.contrib`` function
that builds a ``GradientTransformation``, plus the wrappers and combinators. What cannot
work is listed in ``REFUSED`` with the reason, and must be refused with one ``ConfigError``
line before anything compiles.

Each case, on a tiny model (an embedding and a dense layer) on one device: describe it
(family, name, learning rate), take 6 steps with finite losses and a ``learning_rate``
metric equal to the rate the step used, and compare 6 straight steps with 3 steps, a save
and a restore into a fresh optimizer's template, then 3 more: parameters and optimizer state
must be bitwise equal. The description taken after the steps must be the one taken before;
where a spec can write the optimizer, the fresh one is built from the spec and takes the last
3 steps (so spec and Python object step to the same bits); a loss-scaled Keras optimizer must
step to the bits of the same optimizer unscaled (``TWINS``). The layout rules keep their rank
(as a model's own rules do), with axes of size 1. The enumerated cases round-trip the state
through its saved form in memory (what a checkpoint stores; fast), and their state is also
placed on 8 virtual devices under fsdp; the wrappers whose state is the hard part train
there, through the Trainer with real checkpoints on disk (``FULL_RESUME``), and so do the
factored states on every layout. Every case a spec can write is also described at a
learning rate of exactly 1.
"""

from __future__ import annotations

import inspect
import math
import warnings

import jax
import keras
import numpy as np
import optax
import pytest

from kithara_ops import ConfigError, RunConfig, Trainer, describe_optimizer, feed
from kithara_ops._backend import seed_keras
from kithara_ops.checkpoint.integrity import signature
from kithara_ops.checkpoint.saved_form import from_saved, to_saved
from kithara_ops.optim.spec import build_optimizer
from kithara_ops.program import Program

pytestmark = pytest.mark.slow

LR = 1e-2
EMBEDDINGS, KERNEL, BIAS = "tiny/emb/embeddings", "tiny/out/kernel", "tiny/out/bias"
RULES = [(EMBEDDINGS, ("fsdp", None)), (KERNEL, (None, "fsdp"))]
"""What the size rule gives under fsdp, written as rules so that it keeps its rank elsewhere."""

# ------------------------------------------------------------------------------ the cases

KERAS_WRAPPERS = {"LossScaleOptimizer", "MultiOptimizer"}  # built below, around an inner one
ARGS = {  # factories that need more than a learning rate
    "optax.noisy_sgd": {"key": jax.random.key(0)},
    "optax.contrib.schedule_free": {"base_optimizer": optax.sgd(LR)},
    "optax.contrib.mechanize": {"base_optimizer": optax.sgd(LR)},
    "optax.contrib.sam": {"optimizer": optax.sgd(LR), "adv_optimizer": optax.sgd(LR)},
    "optax.contrib.split_real_and_imaginary": {"inner": optax.adam(LR)},
    "optax.contrib.dpsgd": {"l2_norm_clip": 1.0, "noise_multiplier": 0.1, "seed": 0},
    "optax.contrib.differentially_private_aggregate": {
        "l2_norm_clip": 1.0,
        "noise_multiplier": 0.1,
        "seed": 0,
    },
}
COMPOSED = {  # parts that are no optimizer alone (they would ascend): tried behind one
    "optax.contrib.reduce_on_plateau": lambda part: optax.chain(optax.sgd(LR), part()),
    "optax.contrib.normalize": lambda part: optax.chain(part(), optax.sgd(LR)),
}
NOT_OPTIMIZERS = {  # public optax.contrib functions that build something else
    "optax.contrib.schedule_free_eval_params": "maps a state to evaluation parameters",
}
REFUSED = {  # cannot train in a compiled step over batches: each gets a ConfigError
    "optax.lbfgs": "its zoom line search calls the loss function (value_fn) at other points",
    "optax.contrib.dpsgd": "needs per-example gradients; the step computes batch gradients",
    "optax.contrib.differentially_private_aggregate": "needs per-example gradients",
    "optax.contrib.hutchinson_estimator_diag_hessian": "needs the loss function (obj_fn)",
    "optax.contrib.sophia": "its Hessian estimate needs the loss function (obj_fn)",
}


def _build(factory, name):
    if name in COMPOSED:
        return COMPOSED[name](factory)
    kwargs = dict(ARGS.get(name, {}))
    try:
        accepted = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        accepted = {}
    if "learning_rate" in accepted and "learning_rate" not in kwargs:
        kwargs["learning_rate"] = LR
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return factory(**kwargs)


def keras_cases():
    for name in sorted(dir(keras.optimizers)):
        cls = getattr(keras.optimizers, name)
        concrete = isinstance(cls, type) and issubclass(cls, keras.optimizers.Optimizer)
        if concrete and cls is not keras.optimizers.Optimizer and name not in KERAS_WRAPPERS:
            yield f"keras.{name}", lambda cls=cls: cls(learning_rate=LR)


def optax_cases():
    aliases = [
        (f"optax.{n}", getattr(optax, n))
        for n in sorted(dir(optax))
        if not n.startswith("_")
        and getattr(getattr(optax, n), "__module__", "") == "optax._src.alias"
    ]
    contrib = [
        (f"optax.contrib.{n}", getattr(optax.contrib, n))
        for n in sorted(dir(optax.contrib))
        if not n.startswith(("_", "scale_by_"))  # scale_by_*: the parts the optimizers use
        and inspect.isfunction(getattr(optax.contrib, n))
    ]
    for name, factory in aliases + contrib:
        if name in NOT_OPTIMIZERS:
            continue
        # A contrib function that does not build with a learning rate must be listed in ARGS
        # (this raises at collection, naming it, rather than silently dropping it).
        built = _build(factory, name)
        if isinstance(built, optax.GradientTransformation):
            yield name, lambda factory=factory, name=name: _build(factory, name)


def labels():
    return {EMBEDDINGS: "adam", KERNEL: "sgd", BIAS: "sgd"}


def keras_multi():
    groups = keras.optimizers.OptimizerMap(default_optimizer=keras.optimizers.SGD(LR, 0.9))
    groups["^tiny/emb/.*"] = keras.optimizers.Adam(LR)
    return keras.optimizers.MultiOptimizer(groups)


WRAPPERS = {
    "optax.chain": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(LR)),
    "optax.named_chain": lambda: optax.named_chain(
        ("clip", optax.clip(1.0)), ("opt", optax.adam(LR))
    ),
    "optax.multi_transform": lambda: optax.multi_transform(
        {"adam": optax.adam(LR), "sgd": optax.sgd(LR, momentum=0.9)}, labels()
    ),
    "optax.partition": lambda: optax.partition(
        {"adam": optax.adam(LR), "sgd": optax.sgd(LR)}, labels()
    ),
    "optax.masked": lambda: optax.chain(
        optax.masked(optax.add_decayed_weights(0.1), {k: k != BIAS for k in labels()}),
        optax.sgd(LR),
    ),
    "optax.adamw-mask": lambda: optax.adamw(LR, mask={k: k != BIAS for k in labels()}),
    "optax.freeze": lambda: optax.chain(
        optax.freeze({k: k == EMBEDDINGS for k in labels()}), optax.adam(LR)
    ),
    "optax.flatten": lambda: optax.flatten(optax.adam(LR)),
    "optax.MultiSteps": lambda: optax.MultiSteps(optax.adam(LR), every_k_schedule=2),
    "optax.apply_if_finite": lambda: optax.apply_if_finite(optax.adam(LR), 3),
    "optax.inject_hyperparams": lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=LR),
    "optax.noisy_sgd-seed": lambda: optax.noisy_sgd(LR, seed=0),
    "keras.LossScaleOptimizer": lambda: keras.optimizers.LossScaleOptimizer(
        keras.optimizers.Adam(LR)
    ),
    "keras.MultiOptimizer": keras_multi,
    "keras.loss_scale_factor": lambda: keras.optimizers.Adam(LR, loss_scale_factor=128.0),
    # Schedules whose closures change when first called: described alike before and after.
    "optax.warmup_cosine": lambda: optax.adamw(optax.warmup_cosine_decay_schedule(0, LR, 2, 6)),
    "optax.sgdr": lambda: optax.sgd(
        optax.sgdr_schedule(
            [{"init_value": 0, "peak_value": LR, "warmup_steps": 1, "decay_steps": 3}] * 2
        )
    ),
    # Masks and labels written in a spec select the Trainer's parameters by path.
    "optax.multi_transform-spec": lambda: build_optimizer(
        'optax.multi_transform({"adam": optax.adam(0.01), "sgd": optax.sgd(0.01, 0.9)}, '
        '{"emb": "adam", ".*": "sgd"})'
    ),
    "optax.adamw-mask-spec": lambda: build_optimizer('optax.adamw(0.01, mask="kernel$")'),
}
TWINS = {  # loss scaling changes only the scale the gradients travel at: the same steps
    "keras.LossScaleOptimizer": lambda: keras.optimizers.Adam(LR),
    "keras.loss_scale_factor": lambda: keras.optimizers.Adam(LR),
}
CASES = {**dict(keras_cases()), **dict(optax_cases()), **WRAPPERS}
TRAINABLE = {k: v for k, v in CASES.items() if k not in REFUSED}
FULL_RESUME = [
    "optax.named_chain",
    "optax.contrib.galore",
    "optax.noisy_sgd",
    "optax.noisy_sgd-seed",
    "optax.MultiSteps",
    "optax.apply_if_finite",
    "optax.multi_transform",
    "keras.LossScaleOptimizer",
    "keras.MultiOptimizer",
    "keras.Adafactor",
]

# ------------------------------------------------------------------------------ the runs


def tiny_model() -> keras.Model:
    seed_keras(0)
    model = keras.Sequential(
        [keras.layers.Embedding(16, 8, name="emb"), keras.layers.Dense(16, name="out")],
        name="tiny",
    )
    model.build((None, 4))
    return model


def batches():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 16, (6, 2, 8, 4), dtype=np.int32)
    return [{"x": x, "y": y} for x, y in tokens]


def program_for(optimizer, devices=None, **options) -> Program:
    """The program of a 6-step run of the tiny model; on ``devices`` (default: all 8), under
    fsdp unless told. Nothing is compiled or placed until its steps run."""
    config = RunConfig(**{
        "tracking": False, "system_metrics": False, "sharding": "fsdp", "steps": 6,
        "min_shard_size": 1, "batch_size": 2, "seq_len": 4, **options,
    })  # fmt: skip
    return Program(tiny_model(), optimizer, config, layout_rules=RULES, devices=devices)


def trainer_for(optimizer, devices=None, **options) -> Trainer:
    """The loop over ``program_for``'s program, with the sinks its config names."""
    return Trainer.from_program(program_for(optimizer, devices, **options), batches())


def host(tree):
    """Numpy copies (keys as their data): what a checkpoint holds, off the devices."""
    return jax.tree.map(np.asarray, jax.device_get(to_saved(tree)))


def assert_bitwise(a, b):
    a_leaves, b_leaves = jax.tree.leaves(host(a)), jax.tree.leaves(host(b))
    assert len(a_leaves) == len(b_leaves)
    for x, y in zip(a_leaves, b_leaves):
        np.testing.assert_array_equal(x, y)


def train(program, state, data):
    metrics = []
    for batch in data:
        state, step_metrics = program.steps.train_step(
            state, feed.to_device(batch, program.batch_sharding)
        )
        metrics.append(jax.device_get(step_metrics))
    return state, metrics


@pytest.mark.parametrize("name", sorted(TRAINABLE))
def test_optimizer_describes_trains_and_resumes_exactly(name, eight_devices):
    make = TRAINABLE[name]
    one_device = eight_devices[:1]
    program = program_for(make(), devices=one_device)
    description = program.description
    assert description["family"] == name.split(".")[0]
    assert description["name"] and description["name"] != "unknown", description["chain_text"]
    assert description["learning_rate"] is not None, description["chain_text"]

    data = batches()
    state, first = train(program, program.fresh_state(), data[:3])
    halfway = host(state)
    straight, second = train(program, state, data[3:])
    metrics = first + second
    assert all(math.isfinite(float(m["loss"])) for m in metrics)
    assert int(straight.step) == 6
    program.adapter.write_back(straight.opt_state)  # as train() ends
    assert describe_optimizer(program.adapter.optimizer) == description  # as before the steps
    if name in TWINS:
        twin = program_for(TWINS[name](), devices=one_device)
        assert_bitwise(train(twin, twin.fresh_state(), data)[0].params, straight.params)
    rate = float(metrics[0]["learning_rate"])
    if isinstance(description["learning_rate"], float) and name != "optax.contrib.schedule_free":
        assert rate == pytest.approx(description["learning_rate"], rel=1e-6)
    # A fresh optimizer object's template restores the saved form, and the run continues
    # to the same bits. Where a spec can write the optimizer, the fresh one is built from the
    # spec and takes the last steps itself; otherwise the continuation runs the step compiled
    # above where it fits (a pure function of the state: a second compilation would test
    # nothing more).
    spec_built = name in SPECS
    fresh = program_for(build_optimizer(SPECS[name]) if spec_built else make(), devices=one_device)
    template = fresh.template().abstract
    saved_form = to_saved(template)
    assert [s for _, s in sorted(signature(saved_form).items())] == [
        s for _, s in sorted(signature(halfway).items())
    ]
    placed = jax.device_put(
        jax.tree.unflatten(jax.tree.structure(saved_form), jax.tree.leaves(halfway)),
        jax.tree.map(lambda leaf: leaf.sharding, saved_form),
    )
    # A Keras optimizer's state is keyed by its variables' names, which a fresh object
    # numbers anew: that state takes the fresh program's own step.
    same = jax.tree.structure(template) == jax.tree.structure(program.template().abstract)
    runner = program if same and not spec_built else fresh
    resumed, _ = train(runner, from_saved(placed, template), data[3:])
    assert_bitwise(resumed.params, straight.params)
    assert_bitwise(resumed.opt_state, straight.opt_state)
    # Placed over 8 devices under fsdp too, where the state's leaves are split.
    jax.block_until_ready(program_for(make()).fresh_state())


def assert_resumes_from_disk(make, directory, **options):
    """6 straight steps, saved every 3, against a fresh Trainer resumed at 3: bitwise equal."""
    straight = trainer_for(make(), checkpoint_dir=directory, save_every=3, **options)
    straight.train()
    resumed = trainer_for(make(), checkpoint_dir=directory, **options)
    resumed.train(resume=3, overwrite=True)
    assert int(resumed.state.step) == 6
    assert_bitwise(resumed.state.params, straight.state.params)
    assert_bitwise(resumed.state.opt_state, straight.state.opt_state)


@pytest.mark.parametrize("name", FULL_RESUME)
def test_resume_from_disk_with_a_fresh_optimizer_is_bitwise(name, tmp_path, eight_devices):
    assert_resumes_from_disk(TRAINABLE[name], str(tmp_path / "ckpt"))


LAYOUTS = {"one-device": ("dp", 1), "dp": ("dp", 8), "fsdp": ("fsdp", 8)}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", ["optax.adafactor", "optax.sm3"])
def test_factored_states_train_and_resume_on_every_layout(name, layout, tmp_path, eight_devices):
    """Adafactor's row and column factors and SM3's per-dimension accumulators have a lower
    rank than their parameter, whose spec keeps its rank where its axes have size 1."""
    sharding, count = LAYOUTS[layout]
    assert_resumes_from_disk(
        TRAINABLE[name], str(tmp_path / "ckpt"), devices=eight_devices[:count], sharding=sharding
    )


def test_keras_adam_with_a_schedule_migrates_to_optax_on_resume(tmp_path, eight_devices):
    """Saved by the Keras Adam, resumed by the Optax Adam: the same algorithm and schedule."""
    options = {"checkpoint_dir": str(tmp_path / "ckpt"), "devices": eight_devices[:1]}
    schedule = keras.optimizers.schedules.ExponentialDecay(LR, decay_steps=4, decay_rate=0.5)
    straight = trainer_for(keras.optimizers.Adam(schedule, epsilon=1e-8), save_every=3, **options)
    straight.train()
    migrated = trainer_for(optax.adam(optax.exponential_decay(LR, 4, 0.5), eps=1e-8), **options)
    migrated.train(resume=3, overwrite=True)
    assert int(migrated.state.step) == 6
    counts = optax.tree_utils.tree_get_all_with_path(migrated.state.opt_state, "count")
    assert [int(c) for _, c in counts] == [6, 6]  # Adam's and the schedule's
    # The families place epsilon differently: the parameters agree to its order.
    for key, value in host(straight.state.params).items():
        np.testing.assert_allclose(host(migrated.state.params)[key], value, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_what_cannot_train_is_refused_in_one_line(name):
    namespace, short = name.rsplit(".", 1)
    factory = getattr(optax.contrib if namespace.endswith("contrib") else optax, short)
    with pytest.raises(ConfigError) as refused:
        program_for(_build(factory, name))
    assert "\n" not in str(refused.value) and "cannot be trained here" in str(refused.value)


def _spec_names():
    """Cases a spec can write as ``name(learning_rate=0.01)``: no other arguments needed."""
    for name in sorted(TRAINABLE):
        short = name.rsplit(".", 1)[-1]
        if name in WRAPPERS or name in ARGS or name in COMPOSED:
            continue
        if name.startswith("keras."):
            yield name, f"keras.optimizers.{short}(learning_rate={LR})"
        else:
            factory = getattr(optax.contrib if ".contrib." in name else optax, short)
            if "learning_rate" in inspect.signature(factory).parameters:
                yield name, f"{name}(learning_rate={LR})"


SPECS = dict(_spec_names())


@pytest.mark.parametrize(("name", "spec"), list(_spec_names()), ids=[n for n, _ in _spec_names()])
def test_a_spec_and_the_python_object_describe_alike(name, spec):
    assert describe_optimizer(build_optimizer(spec)) == describe_optimizer(TRAINABLE[name]())


AT_ONE_ALIKE = {  # at a learning rate of 1, built of the very same transformations as another
    "optax.optimistic_adam_v2": "optimistic_adam(1.0, optimism=1.0)",
    "optax.fromage": "its step is lr / sqrt(1 + lr^2), described as the step it takes",
}


@pytest.mark.parametrize("name", sorted(set(SPECS) - set(AT_ONE_ALIKE)))
def test_a_learning_rate_of_one_is_described_as_one(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        at_one = describe_optimizer(_factory(name)(learning_rate=1.0))
    assert at_one["name"] == describe_optimizer(TRAINABLE[name]())["name"], at_one["chain_text"]
    assert at_one["learning_rate"] == 1.0, at_one["chain_text"]


# ------------------------------------------------------------------ non-default hyperparameters

SHARED_NAMES = {"beta_1": "b1", "beta_2": "b2", "epsilon": "eps"}  # describe's shared names


def _factory(name):
    namespace, short = name.rsplit(".", 1)
    if namespace == "keras":
        return getattr(keras.optimizers, short)
    return getattr(optax.contrib if namespace.endswith("contrib") else optax, short)


def _is_float_hyperparameter(param) -> bool:
    """A float argument other than a learning rate: by its default, or, for a ``None``
    default, by an annotation that is a plain number (not a mask, tree or function)."""
    if "learning_rate" in param.name or param.name.startswith("ema_"):
        return False  # Keras' ema_* act only with use_ema=True
    if param.default is None:
        text = str(param.annotation)
        plain = not any(w in text for w in ("Callable", "Any", "Mapping", "ArrayTree", "Params"))
        return "float" in text and plain
    return isinstance(param.default, float) and math.isfinite(param.default)


def _other_value(default) -> float:
    """A valid value other than ``default``: 0.9 -> 0.8, 0.999 -> 0.998, 1e-8 -> 2e-8,
    0 or None -> 0.5 (decays stay in (0, 1), scales and epsilons stay positive)."""
    if not default:
        return 0.5
    if 0.5 < default < 1:
        return round(1 - 2 * (1 - default), 12)
    return default * 2


def non_defaults(factory) -> dict[str, float]:
    """Every float hyperparameter of ``factory``'s signature, set to another value."""
    params = inspect.signature(factory).parameters.values()
    return {p.name: _other_value(p.default) for p in params if _is_float_hyperparameter(p)}


def _described_key(name: str, arg: str) -> str:
    return "decay" if (name, arg) == ("keras.RMSprop", "rho") else SHARED_NAMES.get(arg, arg)


ENUMERATED = sorted(n for n in TRAINABLE if n not in WRAPPERS and n not in COMPOSED)


@pytest.mark.parametrize("name", ENUMERATED)
def test_non_default_hyperparameters_are_described_from_python_and_from_a_spec(name):
    factory = _factory(name)
    changed = non_defaults(factory)
    if not changed:
        pytest.skip("no numeric hyperparameter besides the learning rate")
    kwargs = {**ARGS.get(name, {}), **changed}
    if "learning_rate" in inspect.signature(factory).parameters:
        kwargs = {"learning_rate": LR, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        described = describe_optimizer(factory(**kwargs))
    hyperparams = described["hyperparams"]
    reported = {arg: hyperparams.get(_described_key(name, arg)) for arg in changed}
    assert reported == changed, described["chain_text"]
    if name in ARGS:  # their other arguments (a base optimizer, a key) are no literals
        return
    called = f"keras.optimizers.{name[6:]}" if name.startswith("keras.") else name
    spec = f"{called}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    assert describe_optimizer(build_optimizer(spec)) == described, spec


OPTAX_ENUMERATED = [n for n in ENUMERATED if n.startswith("optax.")]


@pytest.mark.parametrize("name", OPTAX_ENUMERATED)
def test_behind_a_clip_an_optimizer_keeps_its_name_and_fields(name):
    """``chain(clip_by_global_norm, opt)`` is the same algorithm with a clipping threshold."""
    factory = _factory(name)
    kwargs = dict(ARGS.get(name, {}))
    if "learning_rate" in inspect.signature(factory).parameters:
        kwargs = {"learning_rate": LR, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = describe_optimizer(factory(**kwargs))
        clipped = describe_optimizer(optax.chain(optax.clip_by_global_norm(1.0), factory(**kwargs)))
    assert clipped["name"] == alone["name"], clipped["chain_text"]
    assert clipped["hyperparams"] == alone["hyperparams"]
    assert clipped["learning_rate"] == alone["learning_rate"]
    assert clipped["clipping"] == {"kind": "global_norm", "value": 1.0}
