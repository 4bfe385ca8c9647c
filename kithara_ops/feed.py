"""Moving host batches onto the devices, checked once and ahead of the step.

A batch is a mapping with ``x`` and ``y`` (token ids) and an optional ``mask`` (per-token
loss weights), each of shape ``(batch, seq_len)``. Every batch must keep the first batch's
shape, because a new shape would silently recompile the train step.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping

import jax
import numpy as np

from kithara_ops.errors import ConfigError

_DTYPES = {"x": np.int32, "y": np.int32, "mask": np.float32, "segment_ids": np.int32,
           "positions": np.int32}  # fmt: skip


def peek(data: Iterable[Mapping]) -> tuple[Mapping | None, Iterable[Mapping]]:
    """``data``'s first batch (``None`` if empty), and the data to use from now on.

    A re-iterable is returned as it is; a one-pass iterator is re-chained behind its first
    batch, so looking loses nothing.
    """
    iterator = iter(data)
    first = next(iterator, None)
    if iterator is data and first is not None:
        return first, itertools.chain([first], iterator)
    return first, data


def check_first_batch(batch: Mapping, data_parallel: int, grad_accum_steps: int) -> tuple:
    """Validate a batch's keys and shape against the mesh; return its ``(batch, seq_len)``."""
    if not isinstance(batch, Mapping) or "x" not in batch or "y" not in batch:
        got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ConfigError(
            f"A batch must be a mapping with 'x' and 'y' (and optional 'mask'); got {got}."
        )
    shape = np.shape(batch["x"])
    if len(shape) != 2:
        raise ConfigError(f"Batch 'x' must have shape (batch, seq_len); got {shape}.")
    for key in ("y", "mask", "segment_ids", "positions"):
        if key in batch and np.shape(batch[key]) != shape:
            raise ConfigError(
                f"Batch '{key}' has shape {np.shape(batch[key])} but 'x' has {shape}."
            )
    size = shape[0]
    if size % data_parallel:
        raise ConfigError(
            f"batch size {size} is not divisible by the {data_parallel} data-parallel devices: "
            f"use a multiple of {data_parallel}."
        )
    if size % (data_parallel * grad_accum_steps) and grad_accum_steps > 1:
        raise ConfigError(
            f"batch size {size} cannot split into {grad_accum_steps} micro-batches over "
            f"{data_parallel} devices: use a multiple of {data_parallel * grad_accum_steps}."
        )
    return shape


def to_host_arrays(batch: Mapping, shape: tuple) -> dict[str, np.ndarray]:
    """The batch's arrays with the step's dtypes, refusing a shape change."""
    out = {}
    for key, dtype in _DTYPES.items():
        if key not in batch:
            continue
        array = np.asarray(batch[key])
        if array.shape != shape:
            raise ConfigError(
                f"Batch '{key}' has shape {array.shape} but earlier batches had {shape}: "
                "every batch must have the same shape (drop or pad the last one)."
            )
        out[key] = array if array.dtype == dtype else array.astype(dtype)
    return out


def process_rows(sharding: jax.sharding.Sharding, global_shape: tuple) -> list[slice]:
    """The row slices of a ``global_shape`` batch that this process's devices hold, in order.

    Overlapping slices (devices holding the same rows) are listed once.
    """
    starts = {}
    for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
        rows = index[0] if index else slice(None)
        start, stop, _ = rows.indices(global_shape[0])
        starts[start] = max(stop, starts.get(start, start))
    return [slice(start, starts[start]) for start in sorted(starts)]


def to_device(host: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict:
    """Place a global host batch on ``sharding``'s devices.

    With one process this is ``jax.device_put``. With several, every process holds the same
    global batch and hands JAX only the rows its own devices hold, so each example is copied
    once, onto the device that uses it.
    """
    if jax.process_count() == 1:
        return jax.device_put(dict(host), sharding)
    out = {}
    for key, array in host.items():
        rows = process_rows(sharding, array.shape)
        local = np.concatenate([array[r] for r in rows]) if len(rows) > 1 else array[rows[0]]
        out[key] = jax.make_array_from_process_local_data(sharding, local, array.shape)
    return out


def check_eval_source(data: Iterable[Mapping], limit: int | None) -> None:
    """Refuse evaluation data that never ends when no ``limit`` (``eval_steps``) bounds it.

    An evaluation is one pass over its data, so the data must end: a ``Dataset`` that
    repeats (``kithara_ops.data.load`` repeats by default, for training) or an
    ``itertools.cycle``/``repeat``/``count`` would be read forever.

    Raises:
      ConfigError: ``data`` is endless and ``limit`` is ``None``.
    """
    endless = getattr(data, "repeat", False) is True or isinstance(
        data, itertools.cycle | itertools.repeat | itertools.count
    )
    if endless and limit is None:
        raise ConfigError(
            f"eval_data ({type(data).__name__}) repeats forever, so one pass over it never "
            "ends: load it with data.load(..., repeat=False, shuffle=False) or set eval_steps."
        )


def eval_batches(
    data: Iterable[Mapping],
    sharding: jax.sharding.Sharding,
    data_parallel: int,
    limit: int | None,
    stop: Callable[[], bool] = lambda: False,
) -> Iterator[dict[str, jax.Array]]:
    """One pass of evaluation batches (at most ``limit``), checked and placed on the devices.

    ``stop`` is asked at each batch; once it answers ``True`` the pass ends early (a stop
    signal must not wait for a long evaluation).

    Raises:
      ConfigError: the data yields no batch.
    """
    shape = None
    for i, batch in enumerate(data):
        if (limit is not None and i >= limit) or stop():
            break
        if shape is None:
            shape = check_first_batch(batch, data_parallel, 1)
        yield to_device(to_host_arrays(batch, shape), sharding)
    if shape is None and not stop():
        raise ConfigError("eval_data yielded no batches: check the eval source and batch size.")


def prefetch_to_device(
    stream: DataStream, sharding: jax.sharding.Sharding, shape: tuple, size: int = 2
) -> Iterator[tuple[dict[str, jax.Array], dict]]:
    """Yield ``(device batch, stream position after it)`` with ``size`` batches in flight.

    Placing a batch (``to_device``) is asynchronous, so keeping a couple of batches in flight overlaps the
    host-to-device copy with the running step. The position travels with its batch so a
    checkpoint records where the *trained* batches end, not the prefetched ones.
    """
    queue: collections.deque = collections.deque()
    ended: list[Exception] = []

    def enqueue(n: int) -> None:
        for _ in range(n):
            if ended:
                return
            try:
                host = to_host_arrays(next(stream), shape)
            except (StopIteration, ConfigError) as err:
                # The batches already in flight are still delivered; the end is told after.
                ended.append(err)
                return
            queue.append((to_device(host, sharding), stream.get_state()))

    enqueue(size)
    while queue:
        yield queue.popleft()
        enqueue(1)
    if ended and isinstance(ended[0], ConfigError):
        raise ended[0]


class DataStream:
    """An endless stream of host batches over ``data``, with a position that can be restored.

    A re-iterable ``data`` (a list, a ``kithara_ops.data.Dataset``) starts a new epoch when a
    pass ends. The position is the number of batches consumed plus, when the iterator has
    one, its own ``get_state()``; restoring uses ``set_state`` where available and otherwise
    re-reads and skips the consumed batches. A one-pass iterator (a generator) can only move
    forward: ``peek`` looks at its next batch without consuming it.
    """

    def __init__(self, data: Iterable[Mapping]):
        self.data = data
        self.consumed = 0
        self.epoch = 0
        self._iterator = iter(data)
        self._one_pass = self._iterator is data
        self._peeked: list[Mapping] = []

    def __iter__(self) -> DataStream:
        return self

    def peek(self) -> Mapping:
        """The next batch, left in the stream."""
        if not self._peeked:
            self._peeked.append(self._read())
        return self._peeked[0]

    def __next__(self) -> Mapping:
        batch = self._peeked.pop() if self._peeked else self._read()
        self.consumed += 1
        return batch

    def _read(self) -> Mapping:
        try:
            return next(self._iterator)
        except StopIteration:
            if self._one_pass or self.consumed == 0:
                raise ConfigError(
                    f"train_data ran out after {self.consumed} batches: pass a re-iterable "
                    "dataset (a list or kithara_ops.data.load(...)) or fewer steps."
                ) from None
            self.epoch += 1
            self._iterator = iter(self.data)
            return next(self._iterator)

    def get_state(self) -> dict:
        """A small JSON-serialisable position."""
        inner = getattr(self._iterator, "get_state", None)
        return {
            "consumed": self.consumed,
            "epoch": getattr(self._iterator, "epoch", self.epoch),
            "iterator": inner() if inner else None,
        }

    def set_state(self, state: dict) -> None:
        """Continue from a position taken with ``get_state``.

        Raises:
          ConfigError: the data is a one-pass iterator already past that position.
        """
        if self._one_pass:
            if state["consumed"] < self.consumed:
                raise ConfigError(
                    f"train_data is a one-pass iterator at batch {self.consumed}; it cannot go "
                    f"back to batch {state['consumed']}: pass a re-iterable dataset."
                )
            while self.consumed < state["consumed"]:
                next(self)
            return
        self._iterator, self._peeked = iter(self.data), []
        self.epoch = state.get("epoch", 0)
        if state.get("iterator") is not None and hasattr(self._iterator, "set_state"):
            self._iterator.set_state(state["iterator"])
            self.consumed = state["consumed"]
            return
        self.consumed = 0
        self.epoch = 0
        for _ in range(state["consumed"]):
            next(self)
