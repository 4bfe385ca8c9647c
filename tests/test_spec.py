"""Tests for ``kithara_ops.optim.spec``: the optimizer spec parser and builder.

Valid specs are checked against the same optimizer built directly in Python, by behaviour
(Optax: three updates on fixed gradients) or by type and config (Keras). Hostile and
malformed specs must raise ``ConfigError`` naming the offending part, before anything runs.
"""

from __future__ import annotations

import ast
import builtins
import concurrent.futures
import functools
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
from typer.testing import CliRunner

from kithara_ops.cli import app
from kithara_ops.errors import ConfigError
from kithara_ops.optim.spec import build_optimizer, parse_spec, resolve_name

# --------------------------------------------------------------------------- helpers


def _params() -> dict[str, jnp.ndarray]:
    return {"w": jnp.arange(6.0).reshape(2, 3) / 7, "b": jnp.ones(3)}


def run_optax(tx: optax.GradientTransformation, steps: int = 3) -> dict[str, np.ndarray]:
    """Params after ``steps`` updates with fixed gradients that change every step."""
    params = _params()
    state = tx.init(params)
    for step in range(steps):
        grads = {k: v * 0.3 + 0.1 * (step + 1) for k, v in params.items()}
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return {k: np.asarray(v) for k, v in params.items()}


def assert_same_optax(built, expected) -> None:
    assert isinstance(built, optax.GradientTransformation)
    got, want = run_optax(built), run_optax(expected)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=key)


def _config_without_name(optimizer: keras.optimizers.Optimizer) -> dict:
    config = dict(optimizer.get_config())
    config.pop("name")  # auto-uniquified per instance (adam_w, adam_w_1, ...)
    return config


def assert_same_keras(built, expected) -> None:
    assert type(built) is type(expected)
    got, want = _config_without_name(built), _config_without_name(expected)
    if isinstance(want["learning_rate"], dict):  # a serialized schedule
        got_schedule = keras.optimizers.schedules.deserialize(got["learning_rate"])
        want_schedule = keras.optimizers.schedules.deserialize(want["learning_rate"])
        assert type(got_schedule) is type(want_schedule)
        assert got_schedule.get_config() == want_schedule.get_config()
    assert got == want


def assert_same(built, expected) -> None:
    if isinstance(expected, keras.optimizers.Optimizer):
        assert_same_keras(built, expected)
    else:
        assert_same_optax(built, expected)


# --------------------------------------------------------------------------- valid specs

VALID = [
    ("optax.adamw(1e-3)", lambda: optax.adamw(1e-3)),
    (
        "optax.adamw(learning_rate=1e-3, weight_decay=0.01, b1=0.8)",
        lambda: optax.adamw(learning_rate=1e-3, weight_decay=0.01, b1=0.8),
    ),
    ("optax.adam(3e-4, eps=1e-6)", lambda: optax.adam(3e-4, eps=1e-6)),
    (
        "optax.sgd(0.1, momentum=0.9, nesterov=True)",
        lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    ),
    ("optax.lion(1e-4)", lambda: optax.lion(1e-4)),
    ("optax.adafactor(1e-3)", lambda: optax.adafactor(1e-3)),
    (
        "optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))",
        lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
    ),
    (
        "optax.chain(optax.chain(optax.clip(0.5), optax.scale_by_adam()), optax.scale(-1e-3))",
        lambda: optax.chain(
            optax.chain(optax.clip(0.5), optax.scale_by_adam()), optax.scale(-1e-3)
        ),
    ),
    (
        "optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 5, 100))",
        lambda: optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 5, 100)),
    ),
    (
        "optax.sgd(optax.exponential_decay(0.1, 10, 0.5))",
        lambda: optax.sgd(optax.exponential_decay(0.1, 10, 0.5)),
    ),
    (
        "optax.sgd(optax.schedules.linear_schedule(0.1, 0.0, 10), momentum=0.5)",
        lambda: optax.sgd(optax.schedules.linear_schedule(0.1, 0.0, 10), momentum=0.5),
    ),
    ("optax.scale(-0.5)", lambda: optax.scale(-0.5)),
    ("optax.scale(+0.25)", lambda: optax.scale(0.25)),
    (
        "optax.sgd(optax.piecewise_constant_schedule(0.1, {1: 0.5, 2: 0.1}))",
        lambda: optax.sgd(optax.piecewise_constant_schedule(0.1, {1: 0.5, 2: 0.1})),
    ),
    (
        "optax.named_chain(('clip', optax.clip(0.2)), ('sgd', optax.sgd(0.1)))",
        lambda: optax.named_chain(("clip", optax.clip(0.2)), ("sgd", optax.sgd(0.1))),
    ),
    (
        "optax.sgd(optax.join_schedules([optax.constant_schedule(0.1), optax.constant_schedule(0.01)], [2]))",
        lambda: optax.sgd(
            optax.join_schedules([optax.constant_schedule(0.1), optax.constant_schedule(0.01)], [2])
        ),
    ),
    ("optax.contrib.muon(1e-3)", lambda: optax.contrib.muon(1e-3)),
    ("optax.nadamw(1e-3)", lambda: optax.nadamw(1e-3)),
    (
        "  optax.chain(\n    optax.clip_by_global_norm(1.0),  # clip first\n    optax.adamw(1e-3),\n)  ",
        lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
    ),
    (
        "keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=0.01, global_clipnorm=1.0)",
        lambda: keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=0.01, global_clipnorm=1.0),
    ),
    ("keras.AdamW(1e-3)", lambda: keras.optimizers.AdamW(1e-3)),
    (
        "keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True)",
        lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
    ),
    (
        "keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1e-3, 100))",
        lambda: keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1e-3, 100)),
    ),
    (
        "keras.Adam(keras.schedules.ExponentialDecay(1e-2, 10, 0.9, staircase=True))",
        lambda: keras.optimizers.Adam(
            keras.optimizers.schedules.ExponentialDecay(1e-2, 10, 0.9, staircase=True)
        ),
    ),
    (
        "keras.optimizers.SGD(keras.optimizers.schedules.PiecewiseConstantDecay([10, 20], [0.1, 0.05, 0.01]))",
        lambda: keras.optimizers.SGD(
            keras.optimizers.schedules.PiecewiseConstantDecay([10, 20], [0.1, 0.05, 0.01])
        ),
    ),
    ("keras.Lion(1e-4, clipnorm=1.0)", lambda: keras.optimizers.Lion(1e-4, clipnorm=1.0)),
    # Zero, None and whole floats where the libraries accept them: the range checks keep them.
    (
        "optax.adamw(optax.warmup_cosine_decay_schedule(0, 1e-3, 10, 100), weight_decay=0)",
        lambda: optax.adamw(optax.warmup_cosine_decay_schedule(0, 1e-3, 10, 100), weight_decay=0),
    ),
    (
        "optax.sgd(optax.linear_schedule(0, 0.1, 10))",
        lambda: optax.sgd(optax.linear_schedule(0, 0.1, 10)),
    ),
    (
        "optax.adamw(optax.warmup_constant_schedule(0.0, 1e-3, 10))",
        lambda: optax.adamw(optax.warmup_constant_schedule(0.0, 1e-3, 10)),
    ),
    (
        "optax.sgd(optax.cosine_decay_schedule(0.1, 1e2, alpha=0.0))",
        lambda: optax.sgd(optax.cosine_decay_schedule(0.1, 100, alpha=0.0)),
    ),
    (
        "optax.adam(1e-3, b1=0, eps=0.0, eps_root=0)",
        lambda: optax.adam(1e-3, b1=0, eps=0.0, eps_root=0),
    ),
    ("optax.sgd(0.1, momentum=None)", lambda: optax.sgd(0.1, momentum=None)),
    (
        "optax.rmsprop(1e-3, decay=0.9, momentum=None)",
        lambda: optax.rmsprop(1e-3, decay=0.9, momentum=None),
    ),
    (
        "optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2)",
        lambda: optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2).gradient_transformation(),
    ),
    (
        "optax.chain(optax.apply_every(k=2), optax.sgd(0.1))",
        lambda: optax.chain(optax.apply_every(k=2), optax.sgd(0.1)),
    ),
    (
        "optax.chain(" * 31 + "optax.sgd(0.1)" + ")" * 31,  # 32 levels: the limit, allowed
        lambda: functools.reduce(lambda tx, _: optax.chain(tx), range(31), optax.sgd(0.1)),
    ),
    (
        "keras.AdamW(keras.optimizers.schedules.CosineDecay(0.0, 1000, warmup_target=1e-3, warmup_steps=50))",
        lambda: keras.optimizers.AdamW(
            keras.optimizers.schedules.CosineDecay(0.0, 1000, warmup_target=1e-3, warmup_steps=50)
        ),
    ),
    (
        "keras.Adam(keras.schedules.PolynomialDecay(0.0, 100, end_learning_rate=1e-3))",
        lambda: keras.optimizers.Adam(
            keras.optimizers.schedules.PolynomialDecay(0.0, 100, end_learning_rate=1e-3)
        ),
    ),
    (
        "keras.SGD(0.1, momentum=0.0, weight_decay=None)",
        lambda: keras.optimizers.SGD(0.1, momentum=0.0, weight_decay=None),
    ),
]


@pytest.mark.parametrize(("spec", "direct"), VALID, ids=[spec for spec, _ in VALID])
def test_valid_spec_builds_the_same_optimizer(spec, direct):
    assert_same(build_optimizer(spec), direct())


def test_inject_hyperparams_spec():
    spec = "optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3)"
    assert_same(build_optimizer(spec), optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3))


def test_inject_hyperparams_spec_keeps_a_none_its_factory_allows():
    spec = "optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=None)"
    expected = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=None)
    assert_same(build_optimizer(spec), expected)


def test_comparison_tells_different_optimizers_apart():
    """The behavioural comparison is not vacuous: a different learning rate is caught."""
    with pytest.raises(AssertionError):
        assert_same(build_optimizer("optax.adamw(1e-3)"), optax.adamw(2e-3))
    with pytest.raises(AssertionError):
        assert_same(build_optimizer("keras.AdamW(1e-3)"), keras.optimizers.AdamW(2e-3))


@pytest.mark.parametrize("name", ["optax.adamw", "adamw", "  optax.adamw  "])
def test_bare_optax_name_uses_learning_rate_and_weight_decay(name):
    built = build_optimizer(name, learning_rate=3e-3, weight_decay=0.05)
    assert_same(built, optax.adamw(3e-3, weight_decay=0.05))
    with pytest.raises(AssertionError):  # the arguments really were applied
        assert_same(built, optax.adamw(1e-3))


def test_bare_optax_name_without_weight_decay_keeps_the_default():
    assert_same(build_optimizer("optax.adamw", learning_rate=2e-3), optax.adamw(2e-3))
    assert_same(build_optimizer("sgd", learning_rate=0.1), optax.sgd(0.1))


def test_bare_keras_name_uses_learning_rate_and_weight_decay():
    built = build_optimizer("keras.AdamW", learning_rate=3e-3, weight_decay=0.05)
    assert isinstance(built, keras.optimizers.AdamW)
    config = built.get_config()
    assert config["learning_rate"] == pytest.approx(3e-3)
    assert config["weight_decay"] == pytest.approx(0.05)
    assert_same(built, keras.optimizers.AdamW(learning_rate=3e-3, weight_decay=0.05))


def test_bare_keras_long_name():
    built = build_optimizer("keras.optimizers.SGD", learning_rate=0.2)
    assert_same(built, keras.optimizers.SGD(0.2))


def test_bare_name_without_weight_decay_parameter_is_refused():
    with pytest.raises(ConfigError, match=r"optax\.sgd takes no weight_decay"):
        build_optimizer("optax.sgd", weight_decay=0.1)


def test_bare_name_that_takes_no_learning_rate_is_refused():
    with pytest.raises(ConfigError, match=r"optax\.chain could not be built.*'learning_rate'"):
        build_optimizer("optax.chain")


def test_parse_spec_returns_the_checked_tree_without_running_it(monkeypatch):
    calls = []
    monkeypatch.setattr(optax, "adamw", lambda *a, **k: calls.append((a, k)))
    node = parse_spec("  optax.adamw(1e-3, weight_decay=0.1)  ")
    assert isinstance(node, ast.Call)
    assert ast.unparse(node) == "optax.adamw(0.001, weight_decay=0.1)"
    assert calls == []


# --------------------------------------------------------------------------- hostile specs

# (spec, substrings the message must contain). These are refused by the checker, before
# any call is made.
REFUSED = [
    ("__import__('os').system('x')", ["\"__import__('os').system\"", "only named"]),
    ("__import__('os')", ["'__import__' is not an allowed"]),
    ("optax.__dict__", ["'optax.__dict__' is not an allowed"]),
    ("optax.adamw.__globals__", ["'optax.adamw.__globals__' is not an allowed"]),
    ("optax.adamw.__globals__['os']", ["Subscript expressions are not allowed"]),
    ("open('f')", ["'open' is not an allowed"]),
    ("(lambda: 1)()", ["'lambda: 1'", "only named optax/keras callables"]),
    ("optax.adamw(learning_rate=lambda step: 1e-3)", ["Lambda expressions are not allowed"]),
    ("optax.adamw(1e-3)[0]", ["Subscript expressions are not allowed"]),
    ("optax.adamw(1e-3", ["not a valid expression", "'(' was never closed"]),
    ("optax.adamw(1e-3))", ["not a valid expression", "unmatched ')'"]),
    ("optax.adamw(1e-3); 1", ["not a valid expression"]),
    ("import os", ["not a valid expression"]),
    ("optax.not_a_thing(1)", ["'optax.not_a_thing' is not an allowed"]),
    ("numpy.ones(3)", ["'numpy.ones' is not an allowed"]),
    ("os.system('ls')", ["'os.system' is not an allowed"]),
    ("getattr(optax, 'adamw')(1e-3)", ["'getattr' is not an allowed"]),
    ("getattr(optax, 'adamw')", ["'getattr' is not an allowed"]),
    ("keras.layers.Dense(3)", ["'keras.layers.Dense' is not an allowed"]),
    ("keras.optimizers.serialize(1)", ["'keras.optimizers.serialize' is not an allowed"]),
    ("keras.optimizers.get('adam')", ["'keras.optimizers.get' is not an allowed"]),
    ("keras.optimizers.legacy", ["'keras.optimizers.legacy' is not an allowed"]),
    ("keras.ops.add(1, 2)", ["'keras.ops.add' is not an allowed"]),
    ("optax.tree_utils.tree_zeros_like(1)", ["'optax.tree_utils.tree_zeros_like' is not"]),
    ("optax._src.alias.adamw(1e-3)", ["'optax._src.alias.adamw' is not an allowed"]),
    ("[x for x in ()]", ["ListComp expressions are not allowed"]),
    ("f'{1}'", ["JoinedStr expressions are not allowed"]),
    ("optax.adamw(*[1e-3])", ["'*[1e-3]'", "*args is not allowed"]),
    ("optax.adamw(**{'learning_rate': 1e-3})", ["**kwargs is not allowed"]),
    ("optax.piecewise_constant_schedule(0.1, {**{}})", ["**mapping is not allowed"]),
    ("optax.adamw(1e-3 * 2)", ["'1e-3 * 2'", "BinOp expressions are not allowed"]),
    ("(x := 1)", ["NamedExpr expressions are not allowed"]),
    ("optax.adamw(1e-3 if True else 2e-3)", ["IfExp expressions are not allowed"]),
    ("optax.adamw(not 1)", ["UnaryOp expressions are not allowed"]),
    ("optax.scale(-True)", ["'-True'", "a sign may only precede a number"]),
    ("optax.scale(--1)", ["a sign may only precede a number"]),
    ("optax.adamw(b'x')", ["only numbers, strings, booleans and None are literals"]),
    ("optax.adamw(...)", ["only numbers, strings, booleans and None are literals"]),
    ("optax.adamw({1, 2})", ["Set expressions are not allowed"]),
    ("optax.adamw(optax)", ["'optax' is not an allowed"]),
    ("optax.adamw(open('x'))", ["column 13", "'open' is not an allowed"]),
    ("optax.adamw(1e-3).init", ["'optax.adamw(1e-3).init'"]),
    ("optax.adamw(1e-3)\x00", ["not a valid expression", "null bytes"]),
    ("optax.scale(" * 300 + "1" + ")" * 300, ["too many nested", "the limit is 32"]),
    ("", ["Optimizer spec is empty"]),
    ("  \n\t ", ["Optimizer spec is empty"]),
]


@pytest.fixture
def recorders(monkeypatch):
    """Replace what a hostile spec would reach for with recorders; yield the call log."""
    calls: list[tuple[str, tuple]] = []

    def recorder(label, real=None):
        def record(*args, **kwargs):
            calls.append((label, args))
            return real(*args, **kwargs) if real is not None else None

        # The spec checks read signatures; a recorder shows the real one.
        return functools.wraps(real)(record) if real is not None else record

    # JAX loads parts of itself (reading files) on its first trace; do that before `open`
    # is replaced, so the recorders only see what a spec itself would reach for.
    build_optimizer("optax.adam(1e-3)")
    real_import = builtins.__import__

    def record_import(name, *args, **kwargs):
        if name in ("os", "subprocess", "sys"):
            calls.append(("__import__", (name,)))
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recorder("open"))
    monkeypatch.setattr(builtins, "__import__", record_import)
    monkeypatch.setattr(builtins, "eval", recorder("eval"))
    monkeypatch.setattr(builtins, "exec", recorder("exec"))
    monkeypatch.setattr(os, "system", recorder("os.system"))
    monkeypatch.setattr(subprocess, "Popen", recorder("subprocess.Popen"))
    monkeypatch.setattr(optax, "adamw", recorder("optax.adamw", optax.adamw))
    monkeypatch.setattr(optax, "chain", recorder("optax.chain", optax.chain))
    monkeypatch.setattr(optax, "scale", recorder("optax.scale", optax.scale))

    class RecordingAdamW(keras.optimizers.AdamW):
        def __init__(self, *args, **kwargs):
            calls.append(("keras.AdamW", args))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(keras.optimizers, "AdamW", RecordingAdamW)
    return calls


@pytest.mark.parametrize(("spec", "fragments"), REFUSED, ids=[repr(s)[:60] for s, _ in REFUSED])
def test_hostile_spec_is_refused_and_nothing_runs(spec, fragments, recorders):
    with pytest.raises(ConfigError) as info:
        build_optimizer(spec)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert recorders == []


@pytest.mark.parametrize(
    "spec",
    [
        "optax.adamw(open('x'))",
        "optax.adamw(1e-3, weight_decay=os.system('x'))",
        "optax.chain(optax.adamw(1e-3), __import__('os'))",
        "optax.chain(optax.scale(1.0), optax.adamw(1e-3), [x for x in ()])",
        "keras.AdamW(open('x'))",
        "keras.optimizers.AdamW(1e-3, weight_decay=eval('1'))",
    ],
)
def test_whole_tree_is_checked_before_any_call(spec, recorders):
    """A refused part anywhere in the spec stops every call, including allowed outer ones."""
    with pytest.raises(ConfigError, match="Optimizer spec refused"):
        build_optimizer(spec)
    assert recorders == []


def test_recorders_do_see_calls_of_valid_specs(recorders):
    """Control for the tests above: the recorders are the objects the builder calls."""
    build_optimizer("optax.chain(optax.scale(1.0), optax.adamw(1e-3))")
    build_optimizer("keras.AdamW(1e-3)")
    assert ("optax.adamw", (1e-3,)) in recorders
    assert ("optax.scale", (1.0,)) in recorders
    assert ("keras.AdamW", (1e-3,)) in recorders
    assert [label for label, _ in recorders].count("optax.chain") == 1


# (spec, substrings): allowed names whose constructor rejects the arguments.
REJECTED_ARGUMENTS = [
    ("optax.adamw(learning_rate=1e-3, bogus=1)", ["optax.adamw(...)", "'bogus'"]),
    ("optax.adamw(lr=1e-3)", ["optax.adamw(...)", "'lr'"]),
    ("optax.adamw(1e-3,\n  wieght_decay=0.1)", ["'wieght_decay'"]),
    ("optax.adamw(1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3)", ["positional"]),
    ("optax.lookahead(1)", ["optax.lookahead(...)", "sync_period"]),
    ("keras.AdamW(learning_rate='x')", ["learning_rate of keras.AdamW", "not a string"]),
    ("keras.optimizers.Adam(1e-3, dtype='x')", ["keras.optimizers.Adam(...)", "'dtype'"]),
    ("keras.optimizers.Adam(clipnorm=1.0, global_clipnorm=1.0)", ["global_clipnorm"]),
    (
        "optax.warmup_cosine_decay_schedule(0.0, 1e-3, 5, 5)",
        ["optax.warmup_cosine_decay_schedule(...)", "decay_steps"],
    ),
    (
        "keras.optimizers.schedules.PiecewiseConstantDecay([1], [1])",
        ["keras.optimizers.schedules.PiecewiseConstantDecay(...)", "boundaries"],
    ),
    ("optax.chain(optax.adamw(1e-3, bogus=1))", ["optax.adamw(...)", "'bogus'"]),
    ("keras.optimizers.schedules.CosineDecay", ["could not be built", "'learning_rate'"]),
]


@pytest.mark.parametrize(
    ("spec", "fragments"), REJECTED_ARGUMENTS, ids=[s[:60] for s, _ in REJECTED_ARGUMENTS]
)
def test_rejected_arguments_raise_config_error(spec, fragments):
    with pytest.raises(ConfigError) as info:
        build_optimizer(spec)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_string_learning_rate_for_optax_is_refused():
    with pytest.raises(ConfigError, match=r"learning_rate|fast"):
        build_optimizer("optax.adamw('fast')")


@pytest.mark.parametrize(
    "spec",
    [
        "optax.chain(1)",
        "optax.chain(optax.adamw(1e-3), 'x')",
        "optax.MultiSteps(1, 2)",
        "optax.multi_transform(1, 2)",
        "keras.optimizers.LossScaleOptimizer(1)",
    ],
)
def test_attribute_error_from_constructor_is_a_config_error(spec):
    with pytest.raises(ConfigError):
        build_optimizer(spec)


@pytest.mark.parametrize(
    "spec",
    [
        "optax.piecewise_constant_schedule(0.1, {[1]: 0.5})",
        "optax.piecewise_constant_schedule(0.1, {{}: 0.5})",
    ],
)
def test_unhashable_dict_key_is_a_config_error(spec):
    with pytest.raises(ConfigError):
        build_optimizer(spec)


def test_deeply_nested_signs_are_a_config_error():
    with pytest.raises(ConfigError):
        build_optimizer("optax.scale(" + "-" * 10_000 + "1)")


def test_attribute_of_a_call_message_does_not_say_none():
    with pytest.raises(ConfigError) as info:
        build_optimizer("optax.adamw(1e-3).init")
    assert "None is not" not in str(info.value)


def test_bare_typing_alias_with_weight_decay_is_a_config_error():
    with pytest.raises(ConfigError):
        build_optimizer("optax.Schedule", weight_decay=0.1)


# --------------------------------------------------------------------------- literal checks

# (spec, fragments): literals of the wrong kind or out of range, refused before anything is
# built. The first fragment is the offending value as the message quotes it.
BAD_VALUES = [
    # numbers that are not finite reals
    ("optax.adamw(1e999999)", ["'1e999999'", "overflows to infinity"]),
    ("optax.adamw(-1e999999)", ["'-1e999999'", "overflows to infinity"]),
    ("optax.adamw(1e309)", ["'1e309'", "overflows to infinity"]),
    ("optax.adamw(1e-3, b1=-1e39)", ["'-1e39'", "float32"]),
    ("optax.sgd(1j)", ["'1j'", "complex numbers are not allowed"]),
    ("optax.sgd(-1j)", ["'-1j'", "complex numbers are not allowed"]),
    ("optax.piecewise_constant_schedule(0.1, {1: 1e999})", ["'1e999'", "infinity"]),
    (
        "keras.SGD(keras.optimizers.schedules.PiecewiseConstantDecay([10], [0.1, 2j]))",
        ["'2j'", "complex"],
    ),
    # None, booleans, strings and lists where a number goes
    ("optax.adamw(None)", ["'None'", "learning_rate of optax.adamw takes a number, not None"]),
    ("optax.adamw(learning_rate=None)", ["'None'", "not None"]),
    ("optax.adamw(1e-3, weight_decay=None)", ["'None'", "weight_decay of optax.adamw"]),
    ("optax.adamw(True)", ["'True'", "not a boolean"]),
    ("optax.adamw(1e-3, eps=False)", ["'False'", "eps of optax.adamw", "not a boolean"]),
    ("optax.MultiSteps(optax.sgd(0.1), every_k_schedule=True)", ["'True'", "not a boolean"]),
    ("optax.adamw('1e-3')", ["\"'1e-3'\"", "not a string"]),
    ("optax.adamw([1e-3])", ["'[1e-3]'", "not a list"]),
    ("optax.sgd(optax.exponential_decay(0.1, 10, None))", ["'None'", "decay_rate"]),
    ("keras.Adam(keras.schedules.ExponentialDecay(1e-2, None, 0.9))", ["'None'", "decay_steps"]),
    # learning rates must be > 0
    ("keras.SGD(-1.0)", ["'-1.0'", "learning_rate of keras.SGD must be a number > 0"]),
    ("optax.adamw(0)", ["'0'", "> 0"]),
    ("optax.adamw(-1e-3)", ["'-1e-3'", "> 0"]),
    ("keras.AdamW(learning_rate=0.0)", ["'0.0'", "> 0"]),
    (
        "optax.adamw(optax.warmup_cosine_decay_schedule(0.0, -1e-3, 10, 100))",
        ["'-1e-3'", "peak_value"],
    ),
    ("optax.sgd(optax.exponential_decay(0.0, 10, 0.5))", ["'0.0'", "init_value", "> 0"]),
    (
        "keras.Adam(keras.optimizers.schedules.CosineDecay(0.0, 100))",
        ["'0.0'", "initial_learning_rate"],
    ),
    (
        "optax.adamw(optax.warmup_cosine_decay_schedule(-0.1, 1e-3, 10, 100))",
        ["'-0.1'", "init_value", ">= 0"],
    ),
    ("optax.inject_hyperparams(optax.adamw)(learning_rate=-1e-3)", ["'-1e-3'", "> 0"]),
    # decays, betas, epsilons, clipping thresholds
    ("optax.adamw(1e-3, weight_decay=-0.01)", ["'-0.01'", "weight_decay", ">= 0"]),
    ("keras.AdamW(1e-3, weight_decay=-1)", ["'-1'", "weight_decay"]),
    ("optax.adamw(1e-3, b1=1.0)", ["'1.0'", "b1 of optax.adamw", "[0, 1)"]),
    ("optax.adam(1e-3, b2=-0.5)", ["'-0.5'", "b2"]),
    ("keras.Adam(1e-3, beta_1=1.5)", ["'1.5'", "beta_1"]),
    ("optax.sgd(0.1, momentum=1.5)", ["'1.5'", "momentum"]),
    ("keras.SGD(0.1, momentum=-0.9)", ["'-0.9'", "momentum"]),
    ("optax.adam(1e-3, eps=-1e-8)", ["'-1e-8'", "eps", ">= 0"]),
    ("optax.clip_by_global_norm(0.0)", ["'0.0'", "max_norm"]),
    ("optax.chain(optax.clip(-1), optax.sgd(0.1))", ["'-1'", "max_delta"]),
    ("keras.Adam(1e-3, global_clipnorm=0)", ["'0'", "global_clipnorm"]),
    # counts and steps
    ("optax.MultiSteps(optax.sgd(0.1), every_k_schedule=0)", ["'0'", "every_k_schedule", ">= 1"]),
    ("optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2.5)", ["'2.5'", "whole number"]),
    ("optax.chain(optax.apply_every(k=0), optax.sgd(0.1))", ["'0'", "k of optax.apply_every"]),
    ("optax.adamw(optax.cosine_decay_schedule(1e-3, 0))", ["'0'", "decay_steps"]),
    ("optax.sgd(optax.linear_schedule(0.1, 0.0, transition_steps=0))", ["'0'", "transition_steps"]),
    (
        "optax.adamw(optax.warmup_cosine_decay_schedule(0, 1e-3, 10.5, 100))",
        ["'10.5'", "warmup_steps", "whole number >= 0"],
    ),
    (
        "optax.lookahead(optax.sgd(0.1), sync_period=0, slow_step_size=0.5)",
        ["'0'", "sync_period"],
    ),
    ("keras.Adam(keras.optimizers.schedules.CosineDecay(1e-3, 0))", ["'0'", "decay_steps"]),
    # repeated or unknown keywords
    (
        "optax.adamw(learning_rate=1e-3, learning_rate=2e-3)",
        ["'learning_rate=2e-3'", "keyword 'learning_rate' is given twice in optax.adamw(...)"],
    ),
    ("optax.sgd(0.1, momentum=0.9, momentum=0.5)", ["'momentum=0.5'", "given twice"]),
    ("keras.AdamW(weight_decay=0.1, weight_decay=0.2)", ["'weight_decay=0.2'", "given twice"]),
    (
        "optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, learning_rate=1e-3)",
        ["'learning_rate=1e-3'", "given twice"],
    ),
    ("optax.adamw(1e-3, learning_rate=1e-3)", ["'learning_rate'", "multiple values"]),
    ("optax.adamw(1e-3, wieght_decay=0.1)", ["'wieght_decay'", "Did you mean 'weight_decay'?"]),
    # abstract bases and interfaces
    (
        "keras.optimizers.schedules.LearningRateSchedule()",
        ["'keras.optimizers.schedules.LearningRateSchedule'", "is an abstract base class"],
    ),
    (
        "keras.optimizers.Optimizer(1e-3)",
        ["'keras.optimizers.Optimizer'", "such as keras.optimizers.AdamW(1e-3)"],
    ),
    ("keras.optimizers.Optimizer", ["'keras.optimizers.Optimizer'", "abstract base class"]),
    (
        "optax.GradientTransformation(optax.sgd, optax.sgd)",
        ["'optax.GradientTransformation'", "such as optax.adamw(1e-3)"],
    ),
    ("optax.TransformInitFn()", ["'optax.TransformInitFn'", "abstract base class"]),
    (
        "optax.adamw(keras.optimizers.schedules.LearningRateSchedule())",
        ["'keras.optimizers.schedules.LearningRateSchedule'", "abstract"],
    ),
    # what only Python can build
    (
        "keras.optimizers.MultiOptimizer({'.*': keras.optimizers.Adam(0.01)})",
        ["'keras.optimizers.MultiOptimizer'", "kithara_ops.Trainer(model, optimizer, data)"],
    ),
    ("keras.MultiOptimizer", ["'keras.MultiOptimizer'", "a spec cannot write"]),
    # labels that name no transform
    (
        'optax.multi_transform({"adam": optax.adam(0.01)}, {"emb": "sgd", ".*": "adam"})',
        ["label 'sgd' (for paths matching 'emb') names no transform", "are 'adam'"],
    ),
    (
        'optax.partition({"a": optax.adam(0.01), "s": optax.sgd(0.1)}, param_labels={".*": "b"})',
        ["param_labels of optax.partition: label 'b'", "the transforms are 'a', 's'"],
    ),
    # a bad part deep inside a valid-looking spec
    (
        "optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.warmup_cosine_decay_"
        "schedule(0, 1e-3, 10, 100), weight_decay=1e999))",
        ["'1e999'", "infinity"],
    ),
    (
        "optax.chain(\n  optax.clip_by_global_norm(1.0),\n  optax.adamw(-1e-3),\n)",
        ["'-1e-3'", "line 3, column 15"],
    ),
]


@pytest.mark.parametrize(("spec", "fragments"), BAD_VALUES, ids=[s[:70] for s, _ in BAD_VALUES])
def test_bad_value_is_refused_in_one_line_before_anything_runs(spec, fragments, recorders):
    with pytest.raises(ConfigError) as info:
        build_optimizer(spec)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert recorders == []


def test_a_bad_value_stops_the_whole_spec_before_any_call(recorders):
    """The outer calls are allowed names with good arguments; none of them runs either."""
    with pytest.raises(ConfigError, match="'0'"):
        build_optimizer(
            "optax.chain(optax.scale(1.0), optax.adamw(1e-3, b1=0.9, eps=0.0), "
            "optax.MultiSteps(optax.sgd(0.1), every_k_schedule=0))"
        )
    assert recorders == []


@pytest.mark.parametrize(
    ("name", "options", "fragments"),
    [
        ("optax.adamw", {"learning_rate": -1e-3}, ["learning_rate of optax.adamw", "-0.001"]),
        ("keras.AdamW", {"learning_rate": 0.0}, ["> 0", "0.0"]),
        ("adamw", {"learning_rate": float("inf")}, ["infinity", "inf"]),
        ("optax.adamw", {"weight_decay": -0.1}, ["weight_decay of optax.adamw", "-0.1"]),
    ],
)
def test_bare_name_refuses_bad_run_options(name, options, fragments):
    with pytest.raises(ConfigError) as info:
        build_optimizer(name, **options)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        # 2,000 calls deep: over the length limit before any parsing
        ("optax.chain(" * 2000 + "optax.sgd(0.1)" + ")" * 2000, ["characters long"]),
        # within the length limit, nested far too deep for the parser
        ("(" * 1990 + "optax.sgd(0.1)" + ")" * 1990, ["too many nested", "the limit is 32"]),
        # one level past the limit (32 chains around an sgd: 33 calls)
        ("optax.chain(" * 32 + "optax.sgd(0.1)" + ")" * 32, ["too many nested"]),
        ("[" * 40 + "]" * 40, ["too many nested"]),
        # calls on calls nest with one bracket level: counted on the tree
        ("optax.sgd" + "()" * 1900, ["too many nested"]),
        # a chain of attributes and a chain of signs, each thousands deep
        ("optax" + ".x" * 1900, ["is not an allowed"]),
        ("optax.scale(" + "-" * 3900 + "1)", ["too deeply nested or malformed"]),
        ("optax.sgd(0.1" + ", 0" * 1300 + ")", ["too many positional arguments"]),
    ],
    ids=[
        "chain-2000",
        "parens-1990",
        "chain-33",
        "lists-40",
        "calls-on-calls",
        "attributes",
        "signs",
        "arguments",
    ],
)
def test_huge_or_deep_spec_is_one_line_config_error(spec, fragments):
    with pytest.raises(ConfigError) as info:
        build_optimizer(spec)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    for fragment in fragments:
        assert fragment in message, message


# --------------------------------------------------------------------------- the CLI

ROOT = Path(__file__).resolve().parents[1]

CLI_HOSTILE = [
    "optax.adamw(1e999999)",
    "optax.adamw(None)",
    "keras.SGD(-1.0)",
    "optax.MultiSteps(optax.sgd(0.1), every_k_schedule=0)",
    "optax.adamw(learning_rate=1e-3, learning_rate=2e-3)",
    "keras.optimizers.schedules.LearningRateSchedule()",
    "optax.chain(" * 40 + "optax.sgd(0.1)" + ")" * 40,
    "keras.optimizers.Adam(clipnorm=1.0, global_clipnorm=1.0)",  # refused by Keras itself
    "keras.optimizers.MultiOptimizer({'.*': keras.optimizers.Adam(0.01)})",
    'optax.multi_transform({"adam": optax.adam(0.01)}, {"emb": "sgd", ".*": "adam"})',
]


REAL_PROCESS = ("optax.adamw(1e999999)", "keras.SGD(-1.0)")
"""One spec per family runs as a real process: stderr then holds whatever the libraries print."""


def test_cli_refuses_hostile_specs_with_one_error_line(tmp_path, monkeypatch):
    """The command as a user runs it: exit code 2 and one line on stderr.

    One spec per family runs as ``python -m kithara_ops.cli`` with this checkout first on the
    path (two at a time, sharing the import time between the cores); the others run the same
    command through ``CliRunner`` in this process, which checks the same code and line.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    options = ["train", "--steps", "1", "--no-tracking"]

    def run(spec: str) -> tuple[int, str]:
        done = subprocess.run(
            [sys.executable, "-m", "kithara_ops.cli", *options, "--optimizer", spec],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        return done.returncode, done.stderr

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(REAL_PROCESS, pool.map(run, REAL_PROCESS)))
    monkeypatch.chdir(tmp_path)
    for spec in CLI_HOSTILE:
        if spec not in REAL_PROCESS:
            done = CliRunner().invoke(app, [*options, "--optimizer", spec])
            results[spec] = done.exit_code, done.stderr
    assert set(REAL_PROCESS) < set(results) == set(CLI_HOSTILE)
    for spec, (code, stderr) in results.items():
        lines = stderr.splitlines()
        assert code == 2, (spec, stderr)
        assert len(lines) == 1 and lines[0].startswith("Error:"), (spec, stderr)
        assert "Traceback" not in stderr, (spec, stderr)
    assert sorted(tmp_path.iterdir()) == []  # no checkpoint, no mlflow.db


# --------------------------------------------------------------------------- resolve_name


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("optax.adamw", lambda: optax.adamw),
        ("optax.chain", lambda: optax.chain),
        ("optax.schedules.cosine_decay_schedule", lambda: optax.schedules.cosine_decay_schedule),
        ("optax.contrib.muon", lambda: optax.contrib.muon),
        ("keras.optimizers.AdamW", lambda: keras.optimizers.AdamW),
        ("keras.AdamW", lambda: keras.optimizers.AdamW),
        ("keras.optimizers.LossScaleOptimizer", lambda: keras.optimizers.LossScaleOptimizer),
        (
            "keras.optimizers.schedules.CosineDecay",
            lambda: keras.optimizers.schedules.CosineDecay,
        ),
        ("keras.schedules.CosineDecay", lambda: keras.optimizers.schedules.CosineDecay),
    ],
)
def test_resolve_name_allowed(name, expected):
    assert resolve_name(name) is expected()


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "optax",
        "keras",
        "optax.",
        "adamw",  # bare names are expanded by build_optimizer, not by resolve_name
        "optax.not_a_thing",
        "optax.__dict__",
        "optax._src",
        "optax._src.alias.adamw",
        "optax.adamw.__globals__",
        "optax.adamw.__call__",
        "optax.tree_utils",
        "optax.tree_utils.tree_zeros_like",
        "optax.schedules",
        "keras.optimizers",
        "keras.optimizers.schedules",
        "keras.optimizers.legacy",
        "keras.optimizers.serialize",
        "keras.optimizers.get",
        "keras.optimizers.schedules.serialize",
        "keras.optimizers.Adam.from_config",
        "keras.optimizers.Adam.__init__",
        "keras.layers.Dense",
        "keras.Model",
        "keras.ops.add",
        "os.system",
        "numpy.ones",
        "open",
        "__import__",
        "builtins.open",
    ],
)
def test_resolve_name_refused(name):
    assert resolve_name(name) is None


def test_resolve_name_looks_names_up_at_call_time(monkeypatch):
    def fake_adamw(*args, **kwargs):
        return None

    monkeypatch.setattr(optax, "adamw", fake_adamw)
    assert resolve_name("optax.adamw") is fake_adamw
    monkeypatch.setattr(keras.optimizers, "AdamW", fake_adamw)
    assert resolve_name("keras.AdamW") is None  # a Keras name must be an optimizer class
