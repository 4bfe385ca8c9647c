"""Optimizer state shardings read from the state itself (``kithara_ops.optim.placement``)."""

from __future__ import annotations

import jax
import keras
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kithara_ops._backend import seed_keras
from kithara_ops.optim import as_adapter
from kithara_ops.optim.placement import divides
from kithara_ops.state import variable_keys

EMBEDDINGS, KERNEL, BIAS = "tiny/emb/embeddings", "tiny/out/kernel", "tiny/out/bias"


def tiny_model() -> keras.Model:
    seed_keras(0)
    model = keras.Sequential(
        [keras.layers.Embedding(16, 8, name="emb"), keras.layers.Dense(16, name="out")],
        name="tiny",
    )
    model.build((None, 3))
    return model


@pytest.fixture
def mesh(eight_devices):
    return Mesh(np.asarray(eight_devices[:8]), ("fsdp",))


def placed(optimizer, mesh):
    """(the initial state, placed by the adapter's state shardings; the parameter shardings)."""
    model = tiny_model()
    variables = model.trainable_variables
    adapter = as_adapter(optimizer, variables)
    params = {k: v.value for k, v in zip(variable_keys(variables), variables)}
    shardings = {
        EMBEDDINGS: NamedSharding(mesh, PartitionSpec("fsdp", None)),  # (16, 8): 2 rows each
        KERNEL: NamedSharding(mesh, PartitionSpec(None, "fsdp")),  # (8, 16): 2 columns each
        BIAS: NamedSharding(mesh, PartitionSpec("fsdp")),  # (16,)
    }
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = jax.eval_shape(adapter.init, params)
    state_shardings = adapter.state_shardings(abstract, shardings, replicated)
    state = jax.jit(adapter.init, out_shardings=state_shardings)(params)
    return state, shardings


def test_divides_reads_the_mesh_axis_sizes(mesh):
    rows = NamedSharding(mesh, PartitionSpec("fsdp", None))
    assert divides(rows, (16, 3))
    assert not divides(rows, (12, 3))  # 12 rows on 8 devices
    assert not divides(NamedSharding(mesh, PartitionSpec(None, "fsdp")), (16,))
    assert divides(NamedSharding(mesh, PartitionSpec()), (3,))


def test_a_spec_of_size_one_axes_still_needs_its_rank(eight_devices):
    # One device, or the fsdp axis under dp: the spec replicates, but JAX refuses it for a
    # value of lower rank (Adafactor's factors, SM3's accumulators).
    for devices in (eight_devices[:1], eight_devices):
        mesh = Mesh(np.asarray(devices).reshape(-1, 1), ("data", "fsdp"))
        rows = NamedSharding(mesh, PartitionSpec("fsdp", None))
        assert rows.is_fully_replicated
        assert not divides(rows, (16,))
        assert divides(rows, (16, 8)) and divides(rows, (3, 5, 2))


def test_adafactor_factored_slots_are_placed_validly(mesh):
    state, params = placed(optax.adafactor(1e-2, min_dim_size_to_factor=8), mesh)
    factored = state[0]
    # The (16, 8) embedding's factors are vectors: its row spec names two axes, one too many.
    for factor in (factored.v_row[EMBEDDINGS], factored.v_col[EMBEDDINGS]):
        assert factor.ndim == 1 and factor.sharding.is_fully_replicated
    # The bias is not factored: its v has the bias's shape and takes its sharding.
    assert factored.v[BIAS].sharding == params[BIAS]
    assert factored.v[BIAS].addressable_shards[0].data.shape == (2,)


def test_per_layer_and_scalar_leaves_replicate_while_moments_follow(mesh):
    state, params = placed(optax.novograd(1e-2), mesh)
    novograd = state[0]
    assert novograd.nu[KERNEL].shape == ()  # one second moment per layer
    assert novograd.nu[KERNEL].sharding.is_fully_replicated
    assert novograd.mu[KERNEL].sharding == params[KERNEL]
    assert novograd.mu[KERNEL].addressable_shards[0].data.shape == (8, 2)
    assert novograd.count.sharding.is_fully_replicated


def test_multi_transform_with_per_parameter_labels(mesh):
    labels = {EMBEDDINGS: "adam", KERNEL: "sgd", BIAS: "sgd"}
    tx = optax.multi_transform({"adam": optax.adam(1e-2), "sgd": optax.sgd(1e-2, 0.9)}, labels)
    state, params = placed(tx, mesh)
    adam_mu = state.inner_states["adam"].inner_state[0].mu
    assert adam_mu[EMBEDDINGS].sharding == params[EMBEDDINGS]
    assert isinstance(adam_mu[KERNEL], optax.MaskedNode)
    trace = state.inner_states["sgd"].inner_state[0].trace
    assert trace[KERNEL].addressable_shards[0].data.shape == (8, 2)


def test_keys_and_empty_leaves_replicate(mesh):
    key_state, _ = placed(optax.noisy_sgd(1e-2, key=jax.random.key(0)), mesh)
    keys = [leaf for leaf in jax.tree.leaves(key_state) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)]  # fmt: skip
    assert keys and all(k.sharding.is_fully_replicated for k in keys)
    galore, _ = placed(optax.contrib.galore(1e-2), mesh)
    empty = [leaf for leaf in jax.tree.leaves(galore) if leaf.size == 0]
    assert empty and all(leaf.sharding.is_fully_replicated for leaf in empty)


def test_keras_factored_and_multi_optimizer_slots(mesh):
    state, params = placed(keras.optimizers.Adafactor(1e-2), mesh)
    for key, leaf in state.items():
        assert divides(leaf.sharding, leaf.shape), key
    groups = keras.optimizers.OptimizerMap(default_optimizer=keras.optimizers.SGD(1e-2, 0.9))
    groups["^tiny/emb/.*"] = keras.optimizers.Adam(1e-2)
    state, params = placed(keras.optimizers.MultiOptimizer(groups), mesh)
    slots = {k: v for k, v in state.items() if v.shape == (16, 8)}
    assert len(slots) == 2  # Adam's two moments of the embedding, made by the inner Adam
    assert all(v.sharding == params[EMBEDDINGS] for v in slots.values())
