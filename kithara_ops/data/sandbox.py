"""The sandbox chat templates render in, with bounds on their time and output.

A chat template is code from a downloaded model folder. Jinja's immutable sandbox keeps it
from reaching Python objects or changing its inputs, and limits ``range`` to 100,000 items;
it does not bound how long a template runs or how much it writes. Here:

- a row's renderings together may take at most ``MAX_ROW_SECONDS`` seconds (``time_limit``):
  a template stuck in nested loops is stopped between two of its Python operations;
- one rendering may write at most ``MAX_RENDERED_CHARS`` characters, and ``*`` and ``**``
  refuse results beyond that size before computing them (``'x' * 10**10`` would otherwise
  take the machine's memory in one operation);
- ``lipsum``, Jinja's text generator, is left out: no chat template needs it.

Limits: a single operation inside a filter (``center`` of a huge width, say) is not
interrupted until it returns; if it runs out of memory, that is reported like any other
failure of the template.
"""

from __future__ import annotations

import ctypes
import math
import operator
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kithara_ops.errors import ConfigError

MAX_ROW_SECONDS = 10.0
"""Seconds the renderings of one chat row may take together."""

MAX_RENDERED_CHARS = 4_000_000
"""Characters one rendering may produce (about a million tokens)."""

_MAX_POWER_BITS = 100_000  # an integer of ~30,000 digits: more than any template needs


class RenderLimit(ConfigError):
    """A template went past a bound of this module: it is refused, whatever the row."""


class RenderTimeout(BaseException):
    """Raised inside a rendering that ran past its time (a ``BaseException``, so that no
    ``except Exception`` in Jinja or a template's callees swallows it)."""


def sandbox(**options: Any) -> Any:
    """An immutable Jinja sandbox whose ``*`` and ``**`` are bounded, without ``lipsum``."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Bounded(ImmutableSandboxedEnvironment):
        # Intercepted operators are also never folded into constants at compile time.
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
            if op == "*":
                _check_repeat(left, right)
                _check_repeat(right, left)
                return operator.mul(left, right)
            _check_power(left, right)
            return operator.pow(left, right)

    env = Bounded(**options)
    env.globals.pop("lipsum", None)
    return env


def _check_repeat(sequence: Any, times: Any) -> None:
    repeats = isinstance(sequence, str | list | tuple) and isinstance(times, int)
    if repeats and len(sequence) * max(times, 0) > MAX_RENDERED_CHARS:
        raise RenderLimit(f"repeats a sequence {times} times, past {MAX_RENDERED_CHARS:,} items")


def _check_power(base: Any, exponent: Any) -> None:
    integers = isinstance(base, int) and isinstance(exponent, int)
    if integers and abs(base) > 1 and exponent * math.log2(abs(base)) > _MAX_POWER_BITS:
        raise RenderLimit(f"computes {base} ** {exponent}, a number too large")


def render_bounded(template: Any, context: dict[str, Any]) -> str:
    """``template`` rendered with ``context``, refused past ``MAX_RENDERED_CHARS``."""
    chunks, size = [], 0
    for chunk in template.generate(context):
        size += len(chunk)
        if size > MAX_RENDERED_CHARS:
            raise RenderLimit(f"renders more than {MAX_RENDERED_CHARS:,} characters")
        chunks.append(chunk)
    return "".join(chunks)


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ``RenderTimeout`` in this thread if the block runs longer than ``seconds``.

    A timer thread raises the exception asynchronously (``PyThreadState_SetAsyncExc``), so
    pure-Python work such as a template's loops stops at its next operation. A timeout that
    fires as the block ends is withdrawn under a lock: it never escapes the block.
    """
    target, lock = threading.get_ident(), threading.Lock()
    state = {"done": False, "fired": False}

    def expire() -> None:
        with lock:
            if not state["done"]:
                state["fired"] = True
                _raise_in(target, RenderTimeout)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        with lock:
            state["done"] = True
            if state["fired"]:
                _raise_in(target, None)  # withdraw it if it was not raised yet
        timer.cancel()


def _raise_in(thread_id: int, exception: type[BaseException] | None) -> None:
    """Raise ``exception`` in the thread (``None``: withdraw a pending one)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exception) if exception else None
    )
