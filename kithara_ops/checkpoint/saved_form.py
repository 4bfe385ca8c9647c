"""The form a state takes on disk, for the arrays a checkpoint format cannot hold as they are.

Three kinds of leaf need a stand-in, and each comes back exactly:

- a typed PRNG key (``jax.random.key(0)``, kept by ``optax.noisy_sgd``) is stored as its key
  data (``jax.random.key_data``: unsigned integers with a trailing axis), and wrapped again
  with the template's key type;
- an array with no elements (GaLore's projector for a vector) is stored as a replicated
  scalar zero of its dtype, and rebuilt from the template's shape: it has no values to keep;
- an ``OrderedDict`` (``optax.named_chain``'s state) is stored as a dict with the same keys,
  and restored in the template's order, by path, never by position.

``to_saved`` maps a live state or an abstract template to that form; ``from_saved`` maps a
restored tree back, guided by the template.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import jax
import jax.numpy as jnp

from kithara_ops.checkpoint.integrity import path_text


def _is_key(leaf: Any) -> bool:
    return jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _is_empty(leaf: Any) -> bool:
    return math.prod(leaf.shape) == 0


def _replicated_like(sharding: Any) -> Any:
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return sharding


def _saved_leaf(leaf: Any) -> Any:
    if not hasattr(leaf, "dtype"):
        return leaf
    abstract = isinstance(leaf, jax.ShapeDtypeStruct)
    sharding = getattr(leaf, "sharding", None)
    if _is_key(leaf):
        if abstract:
            data = jax.eval_shape(jax.random.key_data, leaf)
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=_replicated_like(sharding))
        return jax.random.key_data(leaf)
    if _is_empty(leaf):
        sharding = _replicated_like(sharding)
        if abstract:
            return jax.ShapeDtypeStruct((), leaf.dtype, sharding=sharding)
        zero = jnp.zeros((), leaf.dtype)
        return jax.device_put(zero, sharding) if sharding is not None else zero
    return leaf


def to_saved(tree: Any) -> Any:
    """``tree`` (arrays or ``ShapeDtypeStruct``) in the form a checkpoint stores."""

    def one(node: Any) -> Any:
        if isinstance(node, collections.OrderedDict):
            return {key: to_saved(value) for key, value in node.items()}
        return _saved_leaf(node)

    return jax.tree.map(one, tree, is_leaf=lambda n: isinstance(n, collections.OrderedDict))


def from_saved(restored: Any, template: Any) -> Any:
    """The restored tree in ``template``'s structure and types.

    Leaves are matched by key path (dict keys, attribute names, indices), so a dict stored for
    an ``OrderedDict`` comes back in the template's order.
    """
    by_path = {
        path_text(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]
    }

    def one(path: tuple, wanted: Any) -> Any:
        value = by_path[path_text(path)]
        if _is_key(wanted):
            return jax.random.wrap_key_data(value, dtype=wanted.dtype)
        if _is_empty(wanted):
            zeros = jnp.zeros(wanted.shape, wanted.dtype)
            sharding = getattr(wanted, "sharding", None)
            return jax.device_put(zeros, sharding) if sharding is not None else zeros
        return value

    return jax.tree_util.tree_map_with_path(one, template)
