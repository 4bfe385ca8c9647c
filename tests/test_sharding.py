"""Unit tests for ``kithara_ops.sharding``: meshes, parameter layouts and batch placement."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from kithara_ops.errors import ConfigError
from kithara_ops.sharding import (
    batch_sharding,
    data_parallel_size,
    local_shard_bytes,
    make_mesh,
    parameter_shardings,
    parameter_spec,
    replicated,
)

P = PartitionSpec


def bytes_on(array: jax.Array, device) -> int:
    return sum(s.data.nbytes for s in array.addressable_shards if s.device == device)


# --------------------------------------------------------------------------- make_mesh


def test_make_mesh_dp_puts_every_device_on_the_data_axis(eight_devices):
    mesh = make_mesh("dp")
    assert mesh.axis_names == ("data", "fsdp")
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1}
    assert list(mesh.devices.ravel()) == list(eight_devices)


def test_make_mesh_fsdp_puts_every_device_on_the_fsdp_axis(eight_devices):
    mesh = make_mesh("fsdp")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8}
    assert list(mesh.devices.ravel()) == list(eight_devices)


@pytest.mark.parametrize(
    ("shape", "strategy"), [((2, 4), "fsdp"), ((4, 2), "fsdp"), ((8, 1), "dp")]
)
def test_make_mesh_with_an_explicit_shape(eight_devices, shape, strategy):
    mesh = make_mesh(strategy, mesh_shape=shape)
    assert (mesh.shape["data"], mesh.shape["fsdp"]) == shape
    # Row-major: the fsdp axis runs over neighbouring devices.
    np.testing.assert_array_equal(mesh.devices, np.asarray(eight_devices).reshape(shape))


def test_make_mesh_over_given_devices(eight_devices):
    devices = eight_devices[2:6]
    assert dict(make_mesh("dp", devices=devices).shape) == {"data": 4, "fsdp": 1}
    mesh = make_mesh("fsdp", mesh_shape=(2, 2), devices=devices)
    assert list(mesh.devices.ravel()) == list(devices)


@pytest.mark.parametrize(("shape", "needs"), [((3, 2), 6), ((2, 8), 16), ((1, 1), 1)])
def test_make_mesh_refuses_a_shape_that_does_not_use_every_device(eight_devices, shape, needs):
    with pytest.raises(ConfigError) as err:
        make_mesh("fsdp", mesh_shape=shape)
    message = str(err.value)
    assert f"mesh_shape {shape} needs {needs} devices but 8 are available" in message
    assert "product is 8" in message


def test_make_mesh_refuses_an_fsdp_axis_under_dp(eight_devices):
    with pytest.raises(
        ConfigError, match=r"mesh_shape \(4, 2\) has an fsdp axis of 2 but sharding is 'dp'"
    ):
        make_mesh("dp", mesh_shape=(4, 2))


# --------------------------------------------------------------------------- data_parallel_size


@pytest.mark.parametrize(
    ("strategy", "shape", "devices", "size"),
    [("dp", None, 8, 8), ("fsdp", None, 8, 8), ("fsdp", (2, 4), 8, 8), ("dp", None, 2, 2)],
)
def test_data_parallel_size_counts_every_device(eight_devices, strategy, shape, devices, size):
    mesh = make_mesh(strategy, mesh_shape=shape, devices=eight_devices[:devices])
    assert data_parallel_size(mesh) == size


# --------------------------------------------------------------------------- batch / replicated


def test_batch_sharding_splits_rows_over_both_axes(eight_devices):
    mesh = make_mesh("fsdp", mesh_shape=(2, 4))
    sharding = batch_sharding(mesh)
    assert sharding.spec == P(("data", "fsdp"))
    x = np.arange(16 * 3).reshape(16, 3)
    placed = jax.device_put(x, sharding)
    seen = set()
    for shard in placed.addressable_shards:
        rows = np.asarray(shard.data)
        assert rows.shape == (2, 3)
        first = int(rows[0, 0]) // 3
        np.testing.assert_array_equal(rows, x[first : first + 2])
        seen.add(first)
    assert seen == set(range(0, 16, 2))  # every device holds distinct examples


def test_replicated_is_a_full_copy_on_every_device(eight_devices):
    mesh = make_mesh("fsdp")
    sharding = replicated(mesh)
    assert sharding.spec == P() and sharding.mesh == mesh
    x = np.arange(12.0).reshape(3, 4)
    placed = jax.device_put(x, sharding)
    assert len(placed.addressable_shards) == 8
    for shard in placed.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), x)


def test_local_shard_bytes_are_the_bytes_each_device_holds(eight_devices):
    mesh = make_mesh("fsdp", mesh_shape=(2, 4))
    arrays = [
        jax.device_put(jnp.ones((8, 6), jnp.bfloat16), NamedSharding(mesh, P("fsdp"))),
        jax.device_put(jnp.ones((4, 2, 3)), NamedSharding(mesh, P(None, "data"))),
        jax.device_put(jnp.ones((3,), jnp.int32), replicated(mesh)),
        jax.device_put(jax.random.split(jax.random.key(0), 8), batch_sharding(mesh)),
    ]
    for array in arrays:
        assert local_shard_bytes(array) == {d: bytes_on(array, d) for d in eight_devices}
    assert set(local_shard_bytes(arrays[0]).values()) == {8 * 6 * 2 // 4}
    assert set(local_shard_bytes(arrays[2]).values()) == {3 * 4}


# --------------------------------------------------------------------------- parameter layouts


def test_parameters_are_replicated_under_dp_whatever_their_size(eight_devices):
    mesh = make_mesh("dp")
    out = parameter_shardings(mesh, {"big": (1024, 1024), "bias": (8,)})
    assert out["big"].spec == P() and out["bias"].spec == P()
    assert all(isinstance(s, NamedSharding) and s.mesh == mesh for s in out.values())


def test_fsdp_splits_the_largest_divisible_dimension(eight_devices):
    mesh = make_mesh("fsdp")
    shapes = {
        "tall": (1024, 16),  # both divisible: the larger wins
        "wide": (16, 1024),
        "odd_rows": (1001, 48),  # the largest is not divisible: the next one is used
        "embedding": (10, 512),
        "three_d": (4, 96, 40),
    }
    out = parameter_shardings(mesh, shapes)
    assert out["tall"].spec == P("fsdp", None)
    assert out["wide"].spec == P(None, "fsdp")
    assert out["odd_rows"].spec == P(None, "fsdp")
    assert out["embedding"].spec == P(None, "fsdp")
    assert out["three_d"].spec == P(None, "fsdp", None)


def test_fsdp_tie_between_dimensions_takes_the_first(eight_devices):
    out = parameter_shardings(make_mesh("fsdp"), {"square": (64, 64)})
    assert out["square"].spec == P("fsdp", None)


def test_fsdp_replicates_when_no_dimension_divides(eight_devices):
    out = parameter_shardings(make_mesh("fsdp"), {"prime": (1009, 13), "odd": (75, 75)})
    assert out["prime"].spec == P() and out["odd"].spec == P()


def test_min_shard_size_keeps_small_parameters_replicated(eight_devices):
    mesh = make_mesh("fsdp")
    shapes = {"just_below": (4088,), "at": (4096,), "norm": (64,), "scalar": ()}
    out = parameter_shardings(mesh, shapes)  # default threshold 4096 elements
    assert out["just_below"].spec == P()  # 4088 = 8 * 511 would split: only its size stops it
    assert out["at"].spec == P("fsdp")
    assert out["norm"].spec == P() and out["scalar"].spec == P()
    below = parameter_shardings(mesh, {"w": (64, 63)})  # 4032 elements, 64 divisible
    assert below["w"].spec == P()
    lowered = parameter_shardings(mesh, {"w": (64, 63), "norm": (64,)}, min_shard_size=64)
    assert lowered["w"].spec == P("fsdp", None) and lowered["norm"].spec == P("fsdp")


def test_fsdp_axis_size_decides_divisibility_on_a_two_axis_mesh(eight_devices):
    # fsdp axis of 4: a dimension of 12 splits (12 % 4 == 0) though 12 % 8 != 0.
    mesh = make_mesh("fsdp", mesh_shape=(2, 4))
    out = parameter_shardings(mesh, {"w": (12, 1000)}, min_shard_size=1)
    assert out["w"].spec == P(None, "fsdp")
    out = parameter_shardings(mesh, {"w": (12, 1001)}, min_shard_size=1)
    assert out["w"].spec == P("fsdp", None)


def test_layout_rules_first_match_wins_and_overrides_the_default(eight_devices):
    mesh = make_mesh("fsdp", mesh_shape=(2, 4))
    rules = [
        (r"embeddings$", ("fsdp", None)),
        (r"/kernel$", P(None, ("data", "fsdp"))),
        (r"kernel", ("fsdp",)),  # never reached for /kernel: the rule above matched first
        (r"dense", ()),
    ]
    shapes = {
        "model/token_embedding/embeddings": (256, 64),
        "model/dense/kernel": (64, 64),
        "model/dense/bias": (16_384,),  # large enough to shard, but the "dense" rule keeps it whole
        "model/head/kernel_q": (4096, 4),
        "model/other/w": (4096, 4),  # no rule: the default (dim 0 over fsdp 4)
    }
    out = parameter_shardings(mesh, shapes, rules)
    assert out["model/token_embedding/embeddings"].spec == P("fsdp", None)
    assert out["model/dense/kernel"].spec == P(None, ("data", "fsdp"))
    assert out["model/dense/bias"].spec == P()
    assert out["model/head/kernel_q"].spec == P("fsdp")
    assert out["model/other/w"].spec == P("fsdp", None)


def test_layout_rule_with_more_dimensions_than_the_parameter_is_refused(eight_devices):
    mesh = make_mesh("fsdp")
    with pytest.raises(ConfigError) as err:
        parameter_shardings(mesh, {"model/norm/scale": (64,)}, [("norm", ("fsdp", None))])
    message = str(err.value)
    assert "'norm'" in message and "'model/norm/scale'" in message
    assert "only 1 dimensions (64,)" in message


def test_layout_rule_on_a_dimension_the_axis_cannot_split_is_refused(eight_devices):
    mesh = make_mesh("fsdp", mesh_shape=(2, 4))
    with pytest.raises(ConfigError) as err:
        parameter_shardings(mesh, {"w": (10, 64)}, [("w", ("fsdp", None))])
    assert "'w' has dimension 0 of size 10, which does not split over 4 devices" in str(err.value)
    # Both axes together: 8 devices, and 12 % 8 != 0.
    with pytest.raises(ConfigError, match=r"dimension 1 of size 12, .* over 8 devices"):
        parameter_shardings(mesh, {"w": (64, 12)}, [("w", (None, ("data", "fsdp")))])
    # A size-1 axis splits nothing, so any size is fine.
    dp = make_mesh("dp")
    assert parameter_shardings(dp, {"w": (10, 3)}, [("w", ("fsdp", None))])["w"].spec == P(
        "fsdp", None
    )


def test_spec_for_one_parameter_matches_the_mapping_version():
    shapes = {"a": (512, 24), "b": (7,), "c": (40, 4096)}
    for key, shape in shapes.items():
        spec = parameter_spec(key, shape, (), fsdp_size=8, min_shard_size=4096)
        want = {"a": P("fsdp", None), "b": P(), "c": P(None, "fsdp")}[key]
        assert spec == want, key


# --------------------------------------------------------------------------- memory per device


def test_fsdp_parameter_takes_an_eighth_of_the_bytes_on_each_device(eight_devices):
    mesh = make_mesh("fsdp")
    shape = (256, 96)
    sharding = parameter_shardings(mesh, {"w": shape})["w"]
    array = jax.device_put(jnp.ones(shape, jnp.float32), sharding)
    total = 256 * 96 * 4
    assert array.sharding.shard_shape(shape) == (32, 96)
    for device in eight_devices:
        assert bytes_on(array, device) == total // 8
    np.testing.assert_array_equal(np.asarray(array), np.ones(shape, np.float32))


def test_replicated_parameter_takes_all_the_bytes_on_each_device(eight_devices):
    mesh = make_mesh("dp")
    sharding = parameter_shardings(mesh, {"w": (256, 96)})["w"]
    array = jax.device_put(jnp.zeros((256, 96), jnp.bfloat16), sharding)
    assert bytes_on(array, eight_devices[0]) == 256 * 96 * 2
