"""The model contract: how a batch feeds a model and which models the Trainer refuses."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest

from kithara_ops import Trainer
from kithara_ops.errors import ConfigError
from kithara_ops.models.adapter import ModelAdapter, adapt_model, check_trainable
from kithara_ops.optim import as_adapter
from kithara_ops.state import variable_keys
from kithara_ops.step import StepBuilder

keras_hub = pytest.importorskip("keras_hub")


def token_batches(vocab=259, rows=8, length=16, seed=0):
    rng = np.random.default_rng(seed)
    while True:
        ids = rng.integers(0, vocab, (rows, length + 1)).astype("int32")
        yield {"x": ids[:, :-1], "y": ids[:, 1:]}


@pytest.fixture(scope="module")
def gpt2(tiny_presets):
    return keras_hub.models.CausalLM.from_preset(str(tiny_presets["gpt2"]))


def test_a_keras_hub_causal_lm_is_fed_its_named_inputs(gpt2):
    adapter = adapt_model(gpt2)
    assert adapter.input_names == ("token_ids", "padding_mask")
    x = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    inputs = adapter.inputs({"x": x, "y": x})
    assert set(inputs) == {"token_ids", "padding_mask"}
    np.testing.assert_array_equal(inputs["token_ids"], x)
    np.testing.assert_array_equal(inputs["padding_mask"], np.ones((2, 6), np.int32))
    assert check_trainable(gpt2, adapter, 16) == 320


def test_a_single_input_model_gets_the_token_ids_array(make_model):
    model = make_model()
    adapter = adapt_model(model)
    x = jnp.zeros((1, 4), jnp.int32)
    assert adapter.input_names is None and adapter.inputs({"x": x, "y": x}) is x


def test_the_loss_mask_is_the_mask_times_the_padding_mask():
    adapter = ModelAdapter(("token_ids", "padding_mask"))
    batch = {
        "x": jnp.ones((1, 4), jnp.int32),
        "y": jnp.ones((1, 4), jnp.int32),
        "mask": jnp.array([[0.0, 1.0, 1.0, 1.0]]),
        "padding_mask": jnp.array([[1, 1, 1, 0]]),
    }
    np.testing.assert_array_equal(adapter.loss_mask(batch), [[0.0, 1.0, 1.0, 0.0]])
    np.testing.assert_array_equal(adapter.inputs(batch)["padding_mask"], [[1, 1, 1, 0]])


@pytest.mark.slow
def test_the_step_loss_of_a_keras_hub_model_is_its_own_logits_cross_entropy(gpt2):
    batch = next(token_batches())
    batch["mask"] = np.tile(np.array([0.0] * 4 + [1.0] * 12, np.float32), (8, 1))
    builder = StepBuilder(
        gpt2,
        as_adapter(optax.sgd(0.1), gpt2.trainable_variables),
        variable_keys(gpt2.trainable_variables),
        variable_keys(gpt2.non_trainable_variables),
    )
    params = dict(zip(builder.param_keys, (v.value for v in gpt2.trainable_variables)))
    frozen = dict(zip(builder.non_trainable_keys, (v.value for v in gpt2.non_trainable_variables)))
    forward = jax.jit(builder._forward, static_argnums=3)
    loss_sum, (count, _) = forward(params, frozen, jax.tree.map(jnp.asarray, batch), False)
    logits = gpt2({"token_ids": batch["x"], "padding_mask": np.ones_like(batch["x"])})
    per_token = optax.softmax_cross_entropy_with_integer_labels(np.asarray(logits), batch["y"])
    assert float(count) == 8 * 12
    np.testing.assert_allclose(float(loss_sum), float(np.sum(per_token * batch["mask"])), rtol=1e-5)


def test_a_backbone_without_lm_head_is_refused_in_one_line_before_compiling(gpt2):
    with pytest.raises(ConfigError, match="no language-model head") as err:
        Trainer(gpt2.backbone, optax.sgd(0.1), token_batches(), steps=1, tracking=False)
    assert "\n" not in str(err.value) and "CausalLM.from_preset" in str(err.value)


def test_a_model_whose_output_is_not_logits_is_refused_in_one_line():
    inputs = keras.Input((None,), dtype="int32")
    hidden = keras.layers.Embedding(259, 8)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden)[..., 0])  # (batch, seq)
    with pytest.raises(ConfigError, match=r"not logits \(batch, seq, vocab\)") as err:
        Trainer(model, optax.sgd(0.1), token_batches(), steps=1, tracking=False)
    assert "\n" not in str(err.value)


def test_a_model_with_inputs_a_token_batch_cannot_fill_is_refused():
    inputs = {
        "pixels": keras.Input((4,), name="pixels"),
        "token_ids": keras.Input((None,), dtype="int32", name="token_ids"),
    }
    out = keras.layers.Embedding(259, 259)(inputs["token_ids"])
    model = keras.Model(inputs, out + keras.ops.sum(inputs["pixels"]))
    with pytest.raises(ConfigError, match=r"takes inputs \['pixels', 'token_ids'\]"):
        adapt_model(model)


def test_precision_is_checked_against_the_models_dtype_policy(make_model):
    model = make_model(dtype="mixed_bfloat16")
    with pytest.raises(ConfigError, match="has dtype policy 'mixed_bfloat16'") as err:
        Trainer(model, optax.sgd(0.1), token_batches(), steps=1, precision="float32",
                tracking=False)  # fmt: skip
    assert "\n" not in str(err.value)
    # Not asked for: the run records the precision the model really has.
    trainer = Trainer(model, optax.sgd(0.1), token_batches(), steps=1, tracking=False)
    assert trainer.config.precision == "mixed_bfloat16"
    with pytest.raises(ConfigError, match="does not train with"):
        Trainer(
            make_model(dtype="float16"), optax.sgd(0.1), token_batches(), steps=1, tracking=False
        )


def test_frozen_means_restorable_and_never_written_by_a_step():
    """Of a model's non-trainable variables, only those no training pass writes may be left
    out of a checkpoint: normalisation statistics change every step and stay in it."""
    from kithara_ops.models.adapter import written_in_training
    from kithara_ops.state import key_groups

    ids = keras.Input((None,), dtype="int32")
    hidden = keras.layers.Embedding(32, 8, name="emb")(ids)
    hidden = keras.layers.BatchNormalization(name="stats")(hidden)
    frozen = keras.layers.Dense(8, name="frozen")
    hidden = frozen(hidden)
    model = keras.Model(ids, keras.layers.Dense(32, name="head")(hidden))
    frozen.trainable = False
    keys = variable_keys(model.non_trainable_variables)
    written = {keys[i] for i in written_in_training(model, adapt_model(model), 8)}
    assert written == {k for k in keys if k.startswith("stats/moving_")}
    assert any(k.startswith("frozen/") for k in keys)

    adapter = as_adapter(optax.sgd(0.1), model.trainable_variables)
    restorable = set(range(len(keys))) - written_in_training(model, adapt_model(model), 8)
    groups = key_groups(model, adapter, restorable)
    assert groups["frozen"] == [k for k in keys if k.startswith("frozen/")]
    assert key_groups(model, adapter)["non_trainable"] == keys and "frozen" not in key_groups(
        model, adapter
    )
