"""Tests of the built-in causal LM, its layout rules and model spec resolution."""

from __future__ import annotations

import importlib
import math
import re
import textwrap

import jax
import keras
import numpy as np
import pytest

from kithara_ops._backend import seed_keras
from kithara_ops.errors import ConfigError
from kithara_ops.models import (
    SIZES,
    CausalLM,
    apply_rotary_embedding,
    causal_lm,
    layout_rules_of,
    resolve_model,
)

VOCAB = 259
SEQ = 16


def _tokens(batch: int = 2, seq: int = SEQ, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, seq)).astype("int32")


def _param_count(model: keras.Model) -> int:
    return sum(math.prod(v.shape) for v in model.trainable_variables)


@pytest.fixture(scope="module")
def tiny() -> keras.Model:
    seed_keras(0)
    return causal_lm("tiny", vocab_size=VOCAB, seq_len=SEQ)


@pytest.fixture(scope="module")
def small() -> keras.Model:
    # Built once for the whole module: it is only counted and inspected, never run.
    return causal_lm("small", vocab_size=VOCAB, seq_len=SEQ)


def test_param_counts(tiny, small):
    assert 0.8e6 <= _param_count(tiny) <= 1.5e6
    assert 10e6 <= _param_count(small) <= 20e6
    assert not small.non_trainable_variables


def test_variable_paths_are_readable(tiny):
    paths = {v.path for v in tiny.weights}
    assert "causal_lm/token_embedding/embeddings" in paths
    assert "causal_lm/block_0/attention/query/kernel" in paths
    assert "causal_lm/block_3/mlp/down/kernel" in paths
    assert "causal_lm/block_2/norm_2/scale" in paths
    assert "causal_lm/final_norm/scale" in paths
    assert "causal_lm/lm_head/kernel" in paths
    assert len(paths) == len(tiny.weights)


def test_forward_shape_and_dtype(tiny):
    logits = tiny(_tokens())
    assert logits.shape == (2, SEQ, VOCAB)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    assert np.all(np.isfinite(np.asarray(logits)))


def test_causality(tiny):
    x = _tokens()
    t = 9
    changed = x.copy()
    changed[:, t] = (changed[:, t] + 1) % VOCAB
    before, after = np.asarray(tiny(x)), np.asarray(tiny(changed))
    np.testing.assert_allclose(before[:, :t], after[:, :t], atol=1e-6)
    assert np.abs(before[:, t:] - after[:, t:]).max(axis=-1).min() > 1e-6


def test_rotary_depends_on_relative_position_only():
    rng = np.random.default_rng(1)
    seq, head_dim = 12, 8
    q = np.broadcast_to(rng.normal(size=head_dim), (1, seq, 1, head_dim)).astype("float32")
    k = np.broadcast_to(rng.normal(size=head_dim), (1, seq, 1, head_dim)).astype("float32")
    rq = np.asarray(apply_rotary_embedding(q))[0, :, 0]
    rk = np.asarray(apply_rotary_embedding(k))[0, :, 0]
    # Rotation preserves norms, and q_s·k_t is the same for equal s - t.
    np.testing.assert_allclose(
        np.linalg.norm(rq, axis=-1), np.linalg.norm(q[0, :, 0], axis=-1), rtol=1e-6
    )
    np.testing.assert_allclose(rq[5] @ rk[2], rq[9] @ rk[6], rtol=1e-5)
    np.testing.assert_allclose(rq[0] @ rk[0], q[0, 0, 0] @ k[0, 0, 0], rtol=1e-5)


def test_mixed_bfloat16_policy():
    model = causal_lm("tiny", vocab_size=VOCAB, seq_len=8, dtype="mixed_bfloat16")
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    block = model.blocks[0]
    assert block.compute_dtype == "bfloat16"
    assert block.attention.query.compute_dtype == "bfloat16"
    assert model.lm_head.variable_dtype == "float32"
    hidden = block(keras.ops.ones((1, 8, SIZES["tiny"].d_model)))
    assert keras.backend.standardize_dtype(hidden.dtype) == "bfloat16"
    logits = model(_tokens(seq=8))
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"


def _check_layout_rules(model: keras.Model) -> None:
    rules = layout_rules_of(model)
    assert rules
    for pattern, spec in rules:
        re.compile(pattern)
        assert set(spec) <= {None, "fsdp"} and "fsdp" in spec
    for v in model.weights:
        specs = [spec for pattern, spec in rules if re.search(pattern, v.path)]
        if math.prod(v.shape) > 4096:
            assert specs, f"{v.path} {v.shape} matches no layout rule"
        for spec in specs:
            assert len(spec) == len(v.shape), (v.path, spec)
            for dim, axis in zip(v.shape, spec, strict=True):
                if axis is not None:
                    assert dim % 8 == 0, (v.path, v.shape, spec)
    assert not any(
        re.search(pattern, v.path)
        for v in model.weights
        if v.path.endswith("/scale")
        for pattern, _ in rules
    )


def test_layout_rules(tiny, small):
    _check_layout_rules(tiny)
    _check_layout_rules(small)
    plain = keras.Sequential([keras.layers.Dense(2)])
    assert layout_rules_of(plain) == []


def test_stateless_call_under_jit_matches_eager(tiny):
    x = _tokens()
    trainable = [v.value for v in tiny.trainable_variables]
    non_trainable = [v.value for v in tiny.non_trainable_variables]

    @jax.jit
    def forward(trainable, non_trainable, x):
        logits, _ = tiny.stateless_call(trainable, non_trainable, x, training=True)
        return logits

    np.testing.assert_allclose(
        np.asarray(forward(trainable, non_trainable, x)),
        np.asarray(tiny(x, training=True)),
        atol=1e-5,
    )


def test_dropout_only_when_training():
    model = causal_lm("tiny", vocab_size=VOCAB, seq_len=8, dropout=0.5)
    seeds = [v.path for v in model.non_trainable_variables]
    assert seeds == [f"causal_lm/block_{i}/dropout_seed/seed_generator_state" for i in range(4)]
    x = _tokens(seq=8)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(x)))
    assert not np.allclose(np.asarray(model(x, training=True)), np.asarray(model(x)))


def test_seeded_init_is_deterministic():
    seed_keras(7)
    first = causal_lm("tiny", vocab_size=VOCAB, seq_len=8)
    seed_keras(7)
    second = causal_lm("tiny", vocab_size=VOCAB, seq_len=8)
    for a, b in zip(first.weights, second.weights, strict=True):
        assert a.path == b.path
        np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value))


def test_save_load_round_trip(tiny, tmp_path):
    path = tmp_path / "model.keras"
    tiny.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, CausalLM)
    assert loaded.get_config() == tiny.get_config()
    x = _tokens()
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(tiny(x)))


def test_unknown_size_is_config_error():
    with pytest.raises(ConfigError, match=r"'tiyn'.*tiny, small"):
        causal_lm("tiyn")


# --- resolve_model ---------------------------------------------------------------------


FACTORY_SOURCE = """
import keras

CALLS = []


class Bigram(keras.Model):
    def __init__(self, vocab_size, **kwargs):
        super().__init__(**kwargs)
        self.embed = keras.layers.Embedding(vocab_size, 8)
        self.head = keras.layers.Dense(vocab_size)

    def call(self, token_ids):
        return self.head(self.embed(token_ids))


def only_vocab(vocab_size):
    CALLS.append({"vocab_size": vocab_size})
    return Bigram(vocab_size)


def everything(**kwargs):
    CALLS.append(kwargs)
    return Bigram(kwargs["vocab_size"])


def not_a_model(vocab_size):
    return {"vocab_size": vocab_size}


def annotated_int(vocab_size) -> int:
    CALLS.append("annotated_int")
    return 3


class NotAModel:
    def __init__(self, vocab_size):
        CALLS.append("NotAModel")


from os import getcwd as reexported  # noqa: E402
"""


@pytest.fixture
def factory_module(tmp_path, monkeypatch, request):
    # A unique name per test: sys.modules would otherwise hand back an earlier copy.
    name = f"model_factory_{request.node.name}".replace("[", "_").replace("]", "_")
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FACTORY_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return name


def test_resolve_builtin_size():
    model = resolve_model("tiny", vocab_size=97, seq_len=8)
    assert isinstance(model, CausalLM)
    assert model.lm_head.kernel.shape == (SIZES["tiny"].d_model, 97)
    assert model.trainable_variables


def test_resolve_factory_gets_only_accepted_kwargs(factory_module):
    model = resolve_model(f"{factory_module}:only_vocab", vocab_size=31, seq_len=8, dtype="float32")
    calls = importlib.import_module(factory_module).CALLS
    assert calls == [{"vocab_size": 31}]
    assert model.trainable_variables  # built by a dummy call
    assert model(_tokens(seq=8) % 31).shape == (2, 8, 31)
    assert layout_rules_of(model) == []


def test_resolve_factory_with_var_kwargs_gets_everything(factory_module):
    resolve_model(f"{factory_module}:everything", vocab_size=31, seq_len=8)
    calls = importlib.import_module(factory_module).CALLS
    assert calls == [{"vocab_size": 31, "seq_len": 8, "dtype": None}]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("huge", r"Unknown model size 'huge'.*tiny, small"),
        ("smal", r"'smal'.*did you mean 'small'"),
        ("no_such_pkg_q8z.models:build", r"'no_such_pkg_q8z\.models'.*installed / on PYTHONPATH"),
        ("a:b:c", r"Malformed model spec 'a:b:c'"),
        (":build", r"Malformed model spec ':build'"),
        ("not a spec", r"Malformed model spec 'not a spec'"),
    ],
)
def test_resolve_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        resolve_model(spec, vocab_size=VOCAB, seq_len=8)


def test_resolve_missing_function(factory_module):
    with pytest.raises(ConfigError, match=rf"'{factory_module}' has no attribute 'missing_fn'"):
        resolve_model(f"{factory_module}:missing_fn", vocab_size=VOCAB, seq_len=8)


def test_resolve_non_model_result(factory_module):
    with pytest.raises(ConfigError, match=r"not_a_model'.*returned builtins\.dict"):
        resolve_model(f"{factory_module}:not_a_model", vocab_size=VOCAB, seq_len=8)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("sys:exit", r"standard-library module 'sys'"),
        ("os:system", r"standard-library module 'os'"),
        ("os.path:join", r"standard-library module 'os'"),
        ("builtins:print", r"standard-library module 'builtins'"),
        ("subprocess:run", r"standard-library module 'subprocess'"),
        ("shutil:rmtree", r"standard-library module 'shutil'"),
    ],
)
def test_factories_from_the_standard_library_are_refused_unimported(spec, message):
    with pytest.raises(ConfigError, match=message):
        resolve_model(spec, vocab_size=VOCAB, seq_len=8)


@pytest.mark.parametrize(
    ("attr", "message"),
    [
        ("reexported", r"names posix's getcwd, which the module only imported"),
        ("NotAModel", r"class NotAModel, which is not a keras.Model"),
        ("annotated_int", r"annotated to return int, not a keras.Model"),
    ],
    ids=["reexported", "class", "annotated"],
)
def test_callables_that_cannot_be_factories_are_refused_before_a_call(
    factory_module, attr, message
):
    with pytest.raises(ConfigError, match=message):
        resolve_model(f"{factory_module}:{attr}", vocab_size=VOCAB, seq_len=8)
    assert importlib.import_module(factory_module).CALLS == []


def test_resume_never_runs_the_factory_a_checkpoint_names(factory_module, tmp_path):
    from kithara_ops import RunConfig, resume
    from kithara_ops.build import build_trainer

    spec = f"{factory_module}:only_vocab"
    config = RunConfig(
        model=spec, data="synthetic", seq_len=8, batch_size=8, steps=2, tracking=False,
        checkpoint_dir=str(tmp_path / "run"),
    )  # fmt: skip
    build_trainer(config).train()
    calls = importlib.import_module(factory_module).CALLS
    assert len(calls) == 1
    with pytest.raises(ConfigError, match=rf"factory '{spec}'.*--model {spec}") as refused:
        resume(tmp_path / "run", steps=3)
    assert "\n" not in str(refused.value)
    assert len(calls) == 1  # refused before anything was called
    result = resume(tmp_path / "run", steps=3, model=spec)
    assert result.step == 3 and len(calls) == 2
