"""Shared test set-up: 8 virtual CPU devices and the JAX backend for Keras.

The flags must be set before JAX is first imported, which is why they live here at the top
of conftest rather than in a fixture.
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiled executables are kept on disk and shared by every test, by the CLI processes the
# tests start (they inherit the environment) and by the next run of the suite: most tests
# compile the same tiny steps.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "kithara-ops-tests-jax-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# Runs the tests make go to a store of their own, never to a server the shell points at.
os.environ["MLFLOW_TRACKING_URI"] = (
    f"sqlite:///{tempfile.mkdtemp(prefix='kithara-tests-')}/mlflow.db"
)
os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)

import jax
import keras
import pytest

from kithara_ops import data, models

pytest_plugins = ["mlflow_server", "postgres_server"]

SEQ_LEN = 32
BATCH = 8


@pytest.fixture(scope="session")
def stdlib_documents():
    """The stdlib corpus, read once per session."""
    return data.read_documents("stdlib")


@pytest.fixture
def stdlib_data(stdlib_documents):
    """Training batches of (8, 32) from the stdlib corpus, seed 0."""
    return data.load(stdlib_documents, seq_len=SEQ_LEN, batch_size=BATCH, seed=0)


@pytest.fixture
def make_model():
    """A factory for the tiny built-in model with seeded, reproducible weights."""

    def make(seed: int = 0, **kwargs):
        keras.utils.set_random_seed(seed)
        return models.causal_lm("tiny", seq_len=SEQ_LEN, **kwargs)

    return make


@pytest.fixture(scope="session")
def eight_devices():
    """The 8 virtual CPU devices; skips if JAX was initialised before the flag was set."""
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
    return devices


class _TinyPresets(dict):
    """Tiny KerasHub preset folders by family, each written the first time it is asked for."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, family):
        import presets

        self[family] = presets.build_preset(family, self.root)
        return self[family]


@pytest.fixture(scope="session")
def tiny_presets(tmp_path_factory):
    """``{family: preset folder}`` of tiny KerasHub causal LMs (see ``tests/presets.py``).

    Folders are built on first use and shared by the whole session; tests only read them.
    """
    pytest.importorskip("keras_hub")
    return _TinyPresets(tmp_path_factory.mktemp("presets"))
