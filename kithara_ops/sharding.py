"""Device mesh and layouts: where every parameter, optimizer slot and batch lives.

The mesh has two named axes, ``data`` and ``fsdp``. Batches are split over both (every
device sees different examples). Under ``dp`` the ``fsdp`` axis has size 1, so parameters
are replicated; under ``fsdp`` each large parameter is split along one dimension over
``fsdp`` and XLA gathers it where a computation needs it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kithara_ops.errors import ConfigError

AXES = ("data", "fsdp")
BATCH_SPEC = PartitionSpec(AXES)

LayoutRule = tuple[str, PartitionSpec | Sequence[str | None]]
"""``(regex matched against a variable path, partition spec for that variable)``."""


KERAS_AXES = {"batch": "data", "model": "fsdp"}
"""Axis names KerasHub's ``get_layout_map`` uses by default, and the mesh axes they become."""


def as_layout_rules(rules) -> list[LayoutRule]:
    """Layout rules from ``[(regex, spec), ...]`` or a Keras ``LayoutMap``.

    A ``LayoutMap`` (e.g. KerasHub's ``Backbone.get_layout_map(device_mesh)``) matches whole
    variable paths, so each key becomes an anchored regex; its axis names are ours (``data``,
    ``fsdp``) or KerasHub's defaults (``batch``, ``model``), which map onto them.

    Raises:
      ConfigError: a layout names an axis the mesh does not have.
    """
    import keras

    if not isinstance(rules, keras.distribution.LayoutMap):
        return list(rules)
    converted = []
    for pattern in rules:
        axes = []
        for axis in rules[pattern].axes:
            name = KERAS_AXES.get(axis, axis)
            if name is not None and name not in AXES:
                raise ConfigError(
                    f"Layout map entry {pattern!r} uses mesh axis {axis!r}: build the map on "
                    f"a mesh with axes {AXES} (or KerasHub's 'batch' and 'model')."
                )
            axes.append(name)
        converted.append((f"^(?:{pattern})$", tuple(axes)))
    return converted


def default_devices() -> list:
    """The devices a mesh spans when none are named: every device of every process."""
    return jax.devices()


def make_mesh(
    sharding: str, mesh_shape: tuple[int, int] | None = None, devices: Sequence | None = None
) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: ``default_devices()``).

    Without ``mesh_shape`` every device goes on the axis the strategy names: ``dp`` gives
    ``(n, 1)``, ``fsdp`` gives ``(1, n)``.
    """
    devices = list(devices if devices is not None else default_devices())
    n = len(devices)
    if mesh_shape is None:
        mesh_shape = (n, 1) if sharding == "dp" else (1, n)
    if int(np.prod(mesh_shape)) != n:
        raise ConfigError(
            f"mesh_shape {tuple(mesh_shape)} needs {int(np.prod(mesh_shape))} devices but "
            f"{n} are available: choose sizes whose product is {n}."
        )
    if sharding == "dp" and mesh_shape[1] != 1:
        raise ConfigError(
            f"mesh_shape {tuple(mesh_shape)} has an fsdp axis of {mesh_shape[1]} but sharding "
            "is 'dp': use --sharding fsdp, or put every device on the data axis."
        )
    return Mesh(np.asarray(devices).reshape(mesh_shape), AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Split the leading (batch) dimension over every device of the mesh."""
    return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def parameter_spec(
    key: str,
    shape: tuple[int, ...],
    rules: Sequence[LayoutRule],
    fsdp_size: int,
    min_shard_size: int,
) -> PartitionSpec:
    """The partition spec of one parameter.

    The first rule whose regex matches ``key`` wins. Otherwise a parameter of at least
    ``min_shard_size`` elements is split along its largest dimension divisible by the fsdp
    axis size, and anything smaller (norm scales, biases) stays replicated.
    """
    for pattern, spec in rules:
        if re.search(pattern, key):
            spec = PartitionSpec(*spec)
            if len(spec) > len(shape):
                raise ConfigError(
                    f"Layout rule {pattern!r} gives {spec} to {key!r}, which has only "
                    f"{len(shape)} dimensions {shape}: fix the rule's spec."
                )
            return spec
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_shard_size:
        return PartitionSpec()
    candidates = [d for d in range(len(shape)) if shape[d] % fsdp_size == 0]
    if not candidates:
        return PartitionSpec()
    dim = max(candidates, key=lambda d: shape[d])
    return PartitionSpec(*[("fsdp" if d == dim else None) for d in range(len(shape))])


def parameter_shardings(
    mesh: Mesh,
    shapes: dict[str, tuple[int, ...]],
    rules: Sequence[LayoutRule] = (),
    min_shard_size: int = 4096,
) -> dict[str, NamedSharding]:
    """``{key: NamedSharding}`` for every parameter, checked against the mesh."""
    out = {}
    for key, shape in shapes.items():
        spec = parameter_spec(key, shape, rules, mesh.shape["fsdp"], min_shard_size)
        for dim, axes in enumerate(spec):
            size = _axes_size(mesh, axes)
            if size > 1 and shape[dim] % size:
                raise ConfigError(
                    f"{key!r} has dimension {dim} of size {shape[dim]}, which does not split "
                    f"over {size} devices ({axes}): change the layout rule or the mesh."
                )
        out[key] = NamedSharding(mesh, spec)
    return out


def local_shard_bytes(array: jax.Array) -> dict[jax.Device, int]:
    """Bytes of ``array`` held by each of this process's devices, read from its sharding.

    A device holding the slices :math:`(s_1, \\dots, s_r)` of the array holds
    :math:`\\text{itemsize} \\cdot \\prod_i |s_i|` bytes: a replicated array counts in full
    on every device, a sharded one by its shard. The buffers are not read because JAX cannot
    list the shards of every array that spans processes (``addressable_shards`` fails on one
    placed from a single device onto a mesh of one device per process).
    """
    indices = array.sharding.addressable_devices_indices_map(array.shape)
    itemsize = array.dtype.itemsize
    return {
        device: itemsize
        * int(np.prod([len(range(*s.indices(n))) for s, n in zip(index, array.shape)]))
        for device, index in indices.items()
    }


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways each batch is split (every device gets a distinct slice)."""
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


def _axes_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        return mesh.shape[axes]
    return int(np.prod([mesh.shape[a] for a in axes]))
