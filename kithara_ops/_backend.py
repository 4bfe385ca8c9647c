"""Selects Keras' JAX backend before Keras is first imported.

Keras reads ``KERAS_BACKEND`` once, at its own import, and falls back to TensorFlow, which
kithara-ops does not install. A user's explicit choice is respected: if Keras is already
imported on another backend we fail loudly rather than silently train on the wrong one.
"""

import os
import sys


def require_jax_backend() -> None:
    """Make sure Keras runs on JAX, or raise ``ImportError`` naming the fix."""
    if "keras" not in sys.modules:
        os.environ.setdefault("KERAS_BACKEND", "jax")
    chosen = os.environ.get("KERAS_BACKEND", "jax")
    if "keras" in sys.modules:
        chosen = sys.modules["keras"].backend.backend()
    if chosen != "jax":
        raise ImportError(
            f"kithara-ops needs Keras on the JAX backend, but KERAS_BACKEND is {chosen!r}: "
            "set KERAS_BACKEND=jax before importing keras."
        )
