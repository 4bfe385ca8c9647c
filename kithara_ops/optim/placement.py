"""Where each array of an optimizer state goes, read from the state itself.

An optimizer state is not a copy of the parameter tree: Adam's moments are, but Adafactor
keeps a row and a column vector per matrix, NovoGrad one number per layer, ``noisy_sgd`` a
PRNG key, GaLore projectors of another shape (empty for vectors), ``multi_transform`` each
inner state over a subset of the parameters. So every leaf is placed on its own: the
parameter it belongs to is the last parameter key on its path, and it takes that
parameter's sharding when the sharding divides the leaf's shape; anything else (scalars,
counters, flags, keys, empty arrays, leaves of no parameter or of a shape the sharding does
not divide) is replicated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax

Sharding = jax.sharding.Sharding


def divides(sharding: Sharding, shape: tuple[int, ...]) -> bool:
    """Whether ``sharding`` can place an array of ``shape``.

    A ``NamedSharding`` with spec :math:`(s_1, \\dots, s_k)` fits a shape
    :math:`(n_1, \\dots, n_r)` when :math:`k \\le r` and every :math:`n_i` is a multiple of
    the product of the mesh axis sizes named by :math:`s_i`. The rank condition holds also
    where every named axis has size 1 (one device, or ``fsdp`` under ``dp``): the spec is
    then fully replicated, yet JAX refuses it for a value of lower rank. Any other fully
    replicated sharding fits any shape; other sharding kinds fit nothing else (they are sized
    for one shape).
    """
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding.is_fully_replicated
    spec = tuple(sharding.spec)
    if len(spec) > len(shape):
        return False
    for size, axes in zip(shape, spec):
        if axes is None:
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        parts = math.prod(sharding.mesh.shape[name] for name in names)
        if size % parts:
            return False
    return True


def owner_in_path(path: tuple, param_keys: Mapping[str, Any]) -> str | None:
    """The innermost dict key on ``path`` that is a parameter key, or None."""
    for entry in reversed(path):
        key = getattr(entry, "key", None)
        if isinstance(key, str) and key in param_keys:
            return key
    return None


def leaf_sharding(leaf: Any, owner: str | None, param_shardings: Mapping[str, Sharding], replicated: Sharding) -> Sharding:  # fmt: skip
    """The sharding of one state leaf (a ``ShapeDtypeStruct``) whose parameter is ``owner``."""
    shape = tuple(leaf.shape)
    sharding = param_shardings.get(owner) if owner is not None else None
    if sharding is None or math.prod(shape) == 0 or not shape:
        return replicated
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return replicated  # a key's data has a trailing axis the spec knows nothing about
    return sharding if divides(sharding, shape) else replicated


def state_shardings(
    abstract_state: Any,
    param_shardings: Mapping[str, Sharding],
    replicated: Sharding,
    owner_of: Callable[[tuple], str | None] | None = None,
) -> Any:
    """A sharding for every leaf of ``abstract_state``, by its shape and its parameter.

    Args:
      abstract_state: the optimizer state's shapes (``jax.eval_shape`` of its init).
      param_shardings: ``{parameter key: sharding}``.
      replicated: the mesh's replicated sharding.
      owner_of: maps a leaf's key path to its parameter key; by default the innermost dict
        key on the path that is a parameter key (how Optax states mirror parameter dicts).
    """
    find = owner_of or (lambda path: owner_in_path(path, param_shardings))
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf_sharding(leaf, find(path), param_shardings, replicated),
        abstract_state,
    )
