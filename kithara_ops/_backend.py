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


def seed_keras(seed: int) -> None:
    """``keras.utils.set_random_seed(seed)``, without importing TensorFlow only to seed it.

    Keras seeds TensorFlow too whenever it can be imported, and it can wherever KerasHub is
    installed: that import costs seconds and a screen of logs on every run, for a generator
    nothing here draws from. If TensorFlow is loaded already, it is seeded as Keras would.
    """
    import keras

    try:
        from keras.src.utils import module_utils

        lazy_tf = module_utils.tensorflow
        undecided = lazy_tf._available is None
    except (ImportError, AttributeError):  # another Keras layout: its own behaviour
        undecided = False
    if not undecided or "tensorflow" in sys.modules:
        keras.utils.set_random_seed(seed)
        return
    lazy_tf._available = False  # for this call only: Keras' later checks import as usual
    try:
        keras.utils.set_random_seed(seed)
    finally:
        lazy_tf._available = None
