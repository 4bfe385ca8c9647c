"""The on-disk form of typed keys, empty arrays and ordered dicts (``kithara_ops.checkpoint.saved_form``)."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from kithara_ops.checkpoint.integrity import checksums, signature
from kithara_ops.checkpoint.saved_form import from_saved, to_saved


def state():
    return {
        "key": jax.random.key(7),
        "empty": jnp.zeros((0, 4), jnp.float32),
        "chain": collections.OrderedDict(z=jnp.arange(3.0), a=jnp.ones((2,), jnp.int32)),
    }


def abstract(tree):
    replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), tree)


def test_the_saved_form_holds_plain_arrays_with_the_same_paths():
    saved = to_saved(state())
    assert saved["key"].dtype == jnp.uint32 and saved["key"].shape == (2,)
    assert saved["empty"].shape == () and saved["empty"].dtype == jnp.float32
    assert type(saved["chain"]) is dict
    # An abstract template maps to the same shapes and dtypes as the arrays.
    assert signature(to_saved(abstract(state()))) == signature(saved)


def test_a_checkpoint_round_trip_gives_back_the_state(tmp_path):
    original = state()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", to_saved(original))
    with ocp.StandardCheckpointer() as checkpointer:
        template = abstract(original)
        restored = from_saved(
            checkpointer.restore(tmp_path / "state", to_saved(template)), template
        )

    assert jax.tree.structure(restored) == jax.tree.structure(original)
    assert list(restored["chain"]) == ["z", "a"]  # the template's order, not sorted
    assert jax.random.key_impl(restored["key"]) == jax.random.key_impl(original["key"])
    np.testing.assert_array_equal(
        jax.random.key_data(restored["key"]), jax.random.key_data(original["key"])
    )
    assert restored["empty"].shape == (0, 4)
    np.testing.assert_array_equal(restored["chain"]["z"], original["chain"]["z"])
    assert checksums(restored) == checksums(original)


def test_checksums_tell_keys_apart():
    assert checksums({"k": jax.random.key(0)}) != checksums({"k": jax.random.key(1)})
