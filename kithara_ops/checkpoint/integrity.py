"""What identifies a saved state: its signature (paths, shapes, dtypes) and its checksums.

A restore compares the saved signature with the state it restores into (a different model is
refused, a different optimizer migrated or reset) and the restored arrays' checksums with the
ones recorded at save time (a damaged checkpoint is passed over).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def checksums(tree: Any) -> dict[str, int]:
    """``{normalised leaf path: checksum}`` of every array of ``tree``, computed on the devices.

    Only one 32-bit number per array leaves the devices. Integer sums wrap around the same
    way in any order, so the checksum does not depend on how the array is sharded.
    """
    return by_path(tree, jax.device_get(checksum_arrays(tree)))


def by_path(tree: Any, sums: list) -> dict[str, int]:
    """``{normalised leaf path: checksum}`` from ``checksum_arrays``' fetched values."""
    paths = [path_text(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    return {path: int(value) for path, value in zip(paths, sums, strict=True)}


@jax.jit
def checksum_arrays(tree: Any) -> list[jax.Array]:
    """One checksum per array of ``tree``, on the devices (nothing is fetched)."""
    return [_checksum(leaf) for leaf in jax.tree.leaves(tree)]


def _checksum(leaf: jax.Array) -> jax.Array:
    """``sum(bits[i] * (2i + 1)) mod 2**32`` over the array's elements viewed as unsigned
    integers: a flipped bit changes it (the weights are odd), and so do swapped elements.

    The flat index is built from iotas in the array's own shape: a reshape to one dimension
    would gather a sharded array.
    """
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)  # a typed key: its bits are what identify it
    if leaf.dtype == jnp.bool_:
        bits = leaf.astype(jnp.uint32)
    else:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[leaf.dtype.itemsize]
        # 64-bit values become two 32-bit words (a trailing axis of 2).
        bits = jax.lax.bitcast_convert_type(leaf, unsigned).astype(jnp.uint32)
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(
            stride % 2**32
        )
        stride *= bits.shape[axis]
    return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)


def signature(tree: Any) -> dict[str, tuple]:
    """``{normalised leaf path: (shape, dtype)}``; the same for a live tree and Orbax metadata.

    Orbax stores NamedTuples as dicts and tuples as lists, so paths are compared by their
    keys and indices only.
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_text(path): (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in leaves}


def path_text(path) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
    return "/".join(parts)
