"""Unit tests for ``kithara_ops.feed``: batch checks, host/device placement, stream positions."""

from __future__ import annotations

import itertools
import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kithara_ops.errors import ConfigError
from kithara_ops.feed import (
    DataStream,
    check_first_batch,
    prefetch_to_device,
    process_rows,
    to_device,
    to_host_arrays,
)

# --------------------------------------------------------------------------- helpers


def numbered_batch(i: int, rows: int = 8, seq: int = 4) -> dict[str, np.ndarray]:
    """A batch whose every value says which batch it is, so order is visible."""
    x = np.full((rows, seq), i, np.int32) + np.arange(rows, dtype=np.int32)[:, None] * 100
    return {"x": x, "y": x + 1, "mask": np.full((rows, seq), 1.0 / (i + 1), np.float32)}


def batch_id(batch) -> int:
    return int(np.asarray(batch["x"])[0, 0])


def mesh_8(shape=(8, 1)) -> Mesh:
    return Mesh(np.asarray(jax.devices()[:8]).reshape(shape), ("data", "fsdp"))


# --------------------------------------------------------------------------- check_first_batch


def test_check_first_batch_returns_the_shape():
    batch = {"x": np.zeros((16, 7)), "y": np.zeros((16, 7)), "mask": np.ones((16, 7))}
    assert check_first_batch(batch, data_parallel=8, grad_accum_steps=2) == (16, 7)
    assert check_first_batch({"x": [[1, 2, 3]], "y": [[2, 3, 4]]}, 1, 1) == (1, 3)


def test_check_first_batch_refuses_a_batch_the_devices_cannot_split():
    batch = {"x": np.zeros((12, 4)), "y": np.zeros((12, 4))}
    with pytest.raises(
        ConfigError, match=r"batch size 12 is not divisible by the 8 .*multiple of 8"
    ):
        check_first_batch(batch, data_parallel=8, grad_accum_steps=1)


@pytest.mark.parametrize(
    ("size", "dp", "accum", "multiple"), [(8, 8, 2, 16), (6, 1, 4, 4), (24, 4, 4, 16)]
)
def test_check_first_batch_refuses_a_batch_micro_batches_cannot_split(size, dp, accum, multiple):
    batch = {"x": np.zeros((size, 4)), "y": np.zeros((size, 4))}
    with pytest.raises(ConfigError) as err:
        check_first_batch(batch, data_parallel=dp, grad_accum_steps=accum)
    message = str(err.value)
    assert f"batch size {size}" in message
    assert f"{accum} micro-batches over {dp} devices" in message
    assert f"multiple of {multiple}" in message


def test_check_first_batch_accepts_exact_multiples_of_devices_times_micro_batches():
    batch = {"x": np.zeros((32, 4)), "y": np.zeros((32, 4))}
    assert check_first_batch(batch, data_parallel=8, grad_accum_steps=4) == (32, 4)


@pytest.mark.parametrize(
    ("batch", "shown"),
    [
        ({"x": np.zeros((8, 4))}, "['x']"),
        ({"y": np.zeros((8, 4)), "inputs": np.zeros((8, 4))}, "['inputs', 'y']"),
        ([np.zeros((8, 4)), np.zeros((8, 4))], "got list"),
        (np.zeros((8, 4)), "got ndarray"),
    ],
)
def test_check_first_batch_names_missing_keys_or_wrong_type(batch, shown):
    with pytest.raises(ConfigError, match="mapping with 'x' and 'y'") as err:
        check_first_batch(batch, 1, 1)
    assert shown in str(err.value)


@pytest.mark.parametrize("shape", [(8,), (8, 4, 2), ()])
def test_check_first_batch_refuses_a_wrong_rank(shape):
    batch = {"x": np.zeros(shape), "y": np.zeros(shape)}
    with pytest.raises(ConfigError, match=r"shape \(batch, seq_len\)") as err:
        check_first_batch(batch, 1, 1)
    assert str(shape) in str(err.value)


@pytest.mark.parametrize("key", ["y", "mask"])
def test_check_first_batch_refuses_y_or_mask_of_another_shape(key):
    batch = {"x": np.zeros((8, 4)), "y": np.zeros((8, 4)), key: np.zeros((8, 5))}
    with pytest.raises(ConfigError, match=rf"'{key}' has shape \(8, 5\) but 'x' has \(8, 4\)"):
        check_first_batch(batch, 1, 1)


# --------------------------------------------------------------------------- to_host_arrays


def test_to_host_arrays_casts_to_the_step_dtypes():
    batch = {
        "x": np.arange(6, dtype=np.int64).reshape(2, 3),
        "y": [[1, 2, 3], [4, 5, 6]],
        "mask": np.array([[1, 0, 1], [0, 1, 1]], np.int8),
        "doc_id": np.zeros((2, 3)),  # extra keys are not sent to the devices
    }
    out = to_host_arrays(batch, (2, 3))
    assert set(out) == {"x", "y", "mask"}
    assert out["x"].dtype == np.int32 and out["y"].dtype == np.int32
    assert out["mask"].dtype == np.float32
    np.testing.assert_array_equal(out["x"], np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(out["y"], [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(out["mask"], [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])


def test_to_host_arrays_keeps_arrays_that_already_have_the_dtype():
    x = np.arange(6, dtype=np.int32).reshape(2, 3)
    out = to_host_arrays({"x": x, "y": x}, (2, 3))
    assert np.shares_memory(out["x"], x)  # no copy on the per-step path
    assert "mask" not in out


def test_to_host_arrays_refuses_a_shape_change():
    with pytest.raises(
        ConfigError, match=r"'x' has shape \(6, 3\) but earlier batches had \(8, 3\)"
    ):
        to_host_arrays({"x": np.zeros((6, 3)), "y": np.zeros((6, 3))}, (8, 3))
    with pytest.raises(ConfigError, match=r"'mask' has shape \(8, 2\)"):
        to_host_arrays(
            {"x": np.zeros((8, 3)), "y": np.zeros((8, 3)), "mask": np.zeros((8, 2))}, (8, 3)
        )


# --------------------------------------------------------------------------- to_device


def test_to_device_places_each_array_on_the_given_sharding(eight_devices):
    sharding = NamedSharding(mesh_8(), PartitionSpec(("data", "fsdp")))
    host = to_host_arrays(numbered_batch(3, rows=16), (16, 4))
    placed = to_device(host, sharding)
    assert set(placed) == {"x", "y", "mask"}
    for key, array in placed.items():
        assert array.sharding == sharding, key
        np.testing.assert_array_equal(np.asarray(array), host[key])
        # 16 rows over 8 devices: device i holds rows 2i and 2i+1.
        shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start)
        assert [s.device for s in shards] == list(sharding.mesh.devices.ravel())
        for i, shard in enumerate(shards):
            np.testing.assert_array_equal(np.asarray(shard.data), host[key][2 * i : 2 * i + 2])


def test_to_device_with_a_replicated_sharding_puts_the_whole_batch_everywhere(eight_devices):
    sharding = NamedSharding(mesh_8(), PartitionSpec())
    host = to_host_arrays(numbered_batch(1), (8, 4))
    placed = to_device(host, sharding)
    assert placed["x"].sharding == sharding
    assert len(placed["x"].addressable_shards) == 8
    for shard in placed["y"].addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), host["y"])


def test_process_rows_lists_each_block_of_rows_once(eight_devices):
    split = NamedSharding(mesh_8(), PartitionSpec(("data", "fsdp")))
    assert process_rows(split, (16, 4)) == [slice(2 * i, 2 * i + 2) for i in range(8)]
    assert process_rows(NamedSharding(mesh_8(), PartitionSpec()), (16, 4)) == [slice(0, 16)]
    # Rows split over the 4-way data axis only: pairs of devices hold the same rows.
    data_only = NamedSharding(mesh_8((4, 2)), PartitionSpec("data"))
    assert process_rows(data_only, (8, 4)) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]


# --------------------------------------------------------------------------- DataStream


def test_data_stream_starts_new_epochs_over_a_re_iterable():
    batches = [numbered_batch(i) for i in range(3)]
    stream = DataStream(batches)
    got = [batch_id(next(stream)) for _ in range(7)]
    assert got == [0, 1, 2, 0, 1, 2, 0]
    assert stream.get_state() == {"consumed": 7, "epoch": 2, "iterator": None}


def test_data_stream_one_pass_iterator_that_runs_out_is_a_config_error():
    stream = DataStream(iter([numbered_batch(i) for i in range(2)]))
    next(stream), next(stream)
    with pytest.raises(ConfigError, match="ran out after 2 batches"):
        next(stream)


def test_data_stream_over_empty_data_is_a_config_error():
    with pytest.raises(ConfigError, match="ran out after 0 batches"):
        next(DataStream([]))


@pytest.mark.parametrize("k", [0, 1, 2, 4, 7])
def test_data_stream_resumes_a_list_at_the_same_position(k):
    batches = [numbered_batch(i) for i in range(3)]
    first = DataStream(batches)
    for _ in range(k):
        next(first)
    state = json.loads(json.dumps(first.get_state()))  # what a checkpoint stores
    second = DataStream(batches)
    second.set_state(state)
    assert second.get_state() == first.get_state()
    for _ in range(4):
        assert batch_id(next(second)) == batch_id(next(first))
    assert second.get_state() == first.get_state()


@pytest.mark.parametrize("k", [0, 3])
def test_data_stream_resumes_a_dataset_through_its_iterator_state(stdlib_data, k):
    first = DataStream(stdlib_data)
    for _ in range(k):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    assert state["consumed"] == k
    assert state["iterator"]["next_batch"] == k
    second = DataStream(stdlib_data)
    second.set_state(state)
    for _ in range(2):
        a, b = next(first), next(second)
        for key in ("x", "y", "mask"):
            np.testing.assert_array_equal(a[key], b[key])
    assert second.get_state() == first.get_state()


def test_data_stream_resumes_a_dataset_across_an_epoch(stdlib_data):
    per_epoch = len(stdlib_data)
    first = DataStream(stdlib_data)
    first.set_state(
        {"consumed": per_epoch - 1, "epoch": 0, "iterator": {"next_batch": per_epoch - 1}}
    )
    next(first), next(first)
    state = first.get_state()
    assert state["epoch"] == 1 and state["consumed"] == per_epoch + 1
    second = DataStream(stdlib_data)
    second.set_state(state)
    np.testing.assert_array_equal(next(second)["x"], next(first)["x"])


def test_a_one_pass_iterator_is_never_rewound_silently():
    stream = DataStream(iter([numbered_batch(i) for i in range(4)]))
    start = stream.get_state()
    assert batch_id(stream.peek()) == 0  # a look does not consume
    stream.set_state(start)  # already there: nothing to do
    assert batch_id(next(stream)) == 0
    with pytest.raises(ConfigError, match="one-pass iterator at batch 1"):
        stream.set_state(start)
    stream.set_state({"consumed": 3, "iterator": None})  # forward is fine
    assert batch_id(next(stream)) == 3


# --------------------------------------------------------------------------- prefetch_to_device


def test_prefetch_yields_batches_in_order_with_their_positions(eight_devices):
    sharding = NamedSharding(mesh_8(), PartitionSpec(("data", "fsdp")))
    batches = [numbered_batch(i) for i in range(3)]
    stream = DataStream(batches)
    out = list(itertools.islice(prefetch_to_device(stream, sharding, (8, 4), size=2), 5))
    assert [batch_id(b) for b, _ in out] == [0, 1, 2, 0, 1]
    assert [pos["consumed"] for _, pos in out] == [1, 2, 3, 4, 5]
    assert [pos["epoch"] for _, pos in out] == [0, 0, 0, 1, 1]
    for (batch, _), i in zip(out, [0, 1, 2, 0, 1]):
        assert batch["x"].sharding == sharding and batch["mask"].sharding == sharding
        np.testing.assert_array_equal(np.asarray(batch["mask"]), batches[i]["mask"])


def test_prefetch_position_is_the_yielded_batch_not_the_stream(eight_devices):
    sharding = NamedSharding(mesh_8(), PartitionSpec(("data", "fsdp")))
    stream = DataStream([numbered_batch(i) for i in range(5)])
    batches = prefetch_to_device(stream, sharding, (8, 4), size=3)
    _, position = next(batches)
    assert stream.consumed == 3  # three batches in flight
    assert position["consumed"] == 1
    # Resuming from the yielded position continues with the batch after it.
    resumed = DataStream([numbered_batch(i) for i in range(5)])
    resumed.set_state(position)
    assert batch_id(next(resumed)) == 1


def test_prefetch_casts_and_checks_every_batch(eight_devices):
    sharding = NamedSharding(mesh_8(), PartitionSpec(("data", "fsdp")))
    good = {k: v.astype(np.int64) if k != "mask" else v for k, v in numbered_batch(0).items()}
    short = numbered_batch(1, rows=4)
    batches = prefetch_to_device(DataStream([good, short]), sharding, (8, 4), size=1)
    first, _ = next(batches)
    assert first["x"].dtype == np.int32
    with pytest.raises(ConfigError, match=r"shape \(4, 4\) but earlier batches had \(8, 4\)"):
        next(batches)


def test_prefetch_delivers_every_batch_of_a_one_pass_iterator(eight_devices):
    sharding = NamedSharding(mesh_8(), PartitionSpec(("data", "fsdp")))
    stream = DataStream(iter([numbered_batch(i) for i in range(3)]))
    batches = prefetch_to_device(stream, sharding, (8, 4), size=2)
    assert [batch_id(next(batches)[0]) for _ in range(3)] == [0, 1, 2]
