"""Unit tests for ``kithara_ops.optim.introspect``: Optax trees read from closures, learning rates."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kithara_ops.optim.introspect import (
    TxNode,
    closure_values,
    factory_name,
    find_learning_rate,
    walk,
)

# --------------------------------------------------------------------------- helpers


def names(node: TxNode) -> list[str]:
    return [child.name for child in node.children]


def custom_transform() -> optax.GradientTransformation:
    def init(params):
        return optax.EmptyState()

    def update(updates, state, params=None):
        return updates, state

    return optax.GradientTransformation(init, update)


def warmup_cosine(step: int, peak: float, warmup: int, total: int, end: float) -> float:
    """Linear warmup from 0 to ``peak``, then cosine down to ``end`` at ``total``."""
    if step < warmup:
        return peak * step / warmup
    t = min(step - warmup, total - warmup) / (total - warmup)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t))


# --------------------------------------------------------------------------- factory_name / closures


def test_factory_name_reads_the_optax_factory_of_an_update_function():
    assert factory_name(optax.scale_by_adam().update) == "scale_by_adam"
    assert factory_name(optax.clip_by_global_norm(1.0).update) == "clip_by_global_norm"
    assert factory_name(custom_transform().update) == "unknown"  # not from optax
    assert factory_name(lambda x: x) == "unknown"
    assert factory_name(np.add) == "unknown"


def test_closure_values_are_the_free_variables():
    scale = 3.5

    def outer():
        offset = 2

        def inner(x):
            return x * scale + offset

        return inner

    assert closure_values(outer()) == {"scale": 3.5, "offset": 2}
    assert closure_values(lambda x: x) == {}
    assert closure_values(len) == {}  # a builtin has no code object


# --------------------------------------------------------------------------- walk


def test_walk_adamw_reads_its_parts_and_hyperparameters():
    root = walk(optax.adamw(3e-4, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.05))
    assert root.name == "chain"
    assert names(root) == ["scale_by_adam", "add_decayed_weights", "scale"]
    adam, decay, scale = root.children
    assert adam.hyperparams["b1"] == 0.8 and adam.hyperparams["b2"] == 0.95
    assert adam.hyperparams["eps"] == 1e-6
    assert decay.hyperparams["weight_decay"] == 0.05
    assert scale.hyperparams["step_size"] == -3e-4
    assert all(not c.children for c in root.children)


def test_walk_chain_with_global_norm_clipping_keeps_the_order():
    tx = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-3))
    root = walk(tx)
    assert root.name == "chain"
    assert names(root) == ["clip_by_global_norm", "chain"]
    clip, inner = root.children
    assert clip.hyperparams == {"max_norm": 0.5}
    assert names(inner) == ["scale_by_adam", "add_decayed_weights", "scale"]


def test_walk_inject_hyperparams_records_the_factory_and_values():
    root = walk(optax.inject_hyperparams(optax.adamw)(learning_rate=2e-3, weight_decay=0.1))
    assert root.name == "inject_hyperparams"
    assert root.functions["inner_factory"] is optax.adamw
    numeric = root.hyperparams["numeric_hps"]
    assert numeric["learning_rate"] == 2e-3 and numeric["weight_decay"] == 0.1


def test_walk_inject_hyperparams_with_a_schedule_keeps_it_apart():
    schedule = optax.linear_schedule(0.1, 0.01, 100)
    root = walk(optax.inject_hyperparams(optax.sgd)(learning_rate=schedule, momentum=0.9))
    assert root.hyperparams["numeric_hps"] == {"momentum": 0.9}
    wrapped = root.hyperparams["sched_hps"]["learning_rate"]
    assert float(wrapped.schedule_fn(50)) == pytest.approx(0.055)


def test_walk_multi_steps_with_a_constant_k():
    root = walk(optax.MultiSteps(optax.adam(1e-3), every_k_schedule=4))
    assert root.name == "MultiSteps"
    assert root.hyperparams == {"every_k_schedule": 4}
    (inner,) = root.children
    assert names(inner) == ["scale_by_adam", "scale"]


def test_walk_multi_steps_with_a_k_schedule_keeps_the_function():
    def every_k(step):
        return 2 + step // 100

    root = walk(optax.MultiSteps(optax.sgd(0.1), every_k_schedule=every_k))
    assert root.hyperparams == {}
    assert root.functions["every_k_schedule"] is every_k
    assert find_learning_rate(root) == pytest.approx(0.1)


def test_walk_a_custom_transformation_is_unknown():
    root = walk(custom_transform())
    assert root.name == "unknown" and root.children == []
    chained = walk(optax.chain(custom_transform(), optax.scale(-0.05)))
    assert names(chained) == ["unknown", "scale"]


def test_walk_masked_transformation_keeps_its_inner_part():
    tx = optax.chain(optax.masked(optax.add_decayed_weights(0.1), lambda p: p), optax.scale(-0.01))
    masked, scale = walk(tx).children
    assert masked.name == "masked" and names(masked) == ["add_decayed_weights"]
    assert masked.children[0].hyperparams == {"weight_decay": 0.1}
    assert scale.hyperparams == {"step_size": -0.01}


def test_walk_named_chain_descends_into_its_parts():
    tx = optax.named_chain(("clip", optax.clip(0.5)), ("opt", optax.sgd(0.1, momentum=0.9)))
    root = walk(tx)
    assert root.name == "named_chain"
    assert names(root) == ["clip", "chain"]
    assert find_learning_rate(root) == pytest.approx(0.1)


# --------------------------------------------------------------------------- find_learning_rate


@pytest.mark.parametrize(
    ("make", "lr"),
    [
        (lambda: optax.adamw(3e-4), 3e-4),
        (lambda: optax.sgd(0.1, momentum=0.9), 0.1),
        (lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(2e-3)), 2e-3),
        (lambda: optax.lion(1e-4), 1e-4),
        (lambda: optax.MultiSteps(optax.adamw(5e-4), every_k_schedule=2), 5e-4),
        (lambda: optax.adafactor(1e-2), 1e-2),  # scale(lr) then scale(-1): not -1
        (lambda: optax.adam(jnp.float32(1e-3)), 1e-3),  # a 0-d array
        (lambda: optax.sgd(1.0), 1.0),  # scale(-1): a rate of 1, not a sign flip
        (lambda: optax.adamw(1.0), 1.0),
        (lambda: optax.adafactor(1.0), 1.0),
    ],
    ids=[
        "adamw",
        "sgd",
        "clip+adam",
        "lion",
        "multisteps",
        "adafactor",
        "array",
        "sgd-1",
        "adamw-1",
        "adafactor-1",
    ],
)
def test_find_learning_rate_returns_the_constant(make, lr):
    found = find_learning_rate(walk(make()))
    assert isinstance(found, float)
    assert found == pytest.approx(lr, rel=1e-6)


def test_find_learning_rate_returns_the_schedule_with_optax_values():
    args = {"init_value": 0.0, "peak_value": 1e-3, "warmup_steps": 10, "decay_steps": 100}
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(optax.warmup_cosine_decay_schedule(**args, end_value=1e-5)),
    )
    found = find_learning_rate(walk(tx))
    assert callable(found)
    reference = optax.warmup_cosine_decay_schedule(**args, end_value=1e-5)
    for step in (0, 5, 10, 40, 100, 150):
        value = float(found(jnp.int32(step)))
        assert value >= 0.0  # the learning rate itself, not Optax's negated step
        assert value == pytest.approx(float(reference(step)), abs=1e-9)
        assert value == pytest.approx(warmup_cosine(step, 1e-3, 10, 100, 1e-5), abs=1e-8)


def test_find_learning_rate_of_an_explicit_scale_by_learning_rate_schedule():
    schedule = optax.exponential_decay(0.1, transition_steps=10, decay_rate=0.5)
    tx = optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(schedule))
    found = find_learning_rate(walk(tx))
    for step, want in ((0, 0.1), (10, 0.05), (20, 0.025), (5, 0.1 * 0.5**0.5)):
        assert float(found(step)) == pytest.approx(want, rel=1e-6)


def test_find_learning_rate_with_flip_sign_false_and_a_separate_sign():
    tx = optax.chain(
        optax.scale_by_adam(),
        optax.scale_by_learning_rate(0.02, flip_sign=False),
        optax.scale(-1.0),
    )
    assert find_learning_rate(walk(tx)) == pytest.approx(0.02)


@pytest.mark.parametrize(
    "make",
    [
        custom_transform,
        optax.scale_by_adam,  # a direction without a learning rate
        lambda: optax.chain(optax.scale_by_adam(), optax.scale(0.5)),  # an ascent, no sign flip
        lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-3),  # read from the state
    ],
    ids=["custom", "scale_by_adam", "positive-scale", "inject_hyperparams"],
)
def test_find_learning_rate_returns_none_when_nothing_is_recognised(make):
    assert find_learning_rate(walk(make())) is None


def test_find_learning_rate_takes_the_last_scale_of_a_chain():
    # The learning rate is applied after the direction: the search goes from the end.
    tx = optax.chain(optax.scale(-0.5), optax.scale_by_adam(), optax.scale(-0.003))
    assert find_learning_rate(walk(tx)) == pytest.approx(0.003)
    assert find_learning_rate(TxNode("chain", {}, {}, [])) is None
