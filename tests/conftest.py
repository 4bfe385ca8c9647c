"""Shared test set-up: devices, the JAX backend for Keras, a warm compilation cache.

The test process has 8 virtual CPU devices, but a Trainer's mesh spans one of them unless the
test asks for ``eight_devices``: an 8-way partitioned compile costs several times a 1-device
one, and most tests are not about sharding. Processes the tests start get one device too
(``XLA_FLAGS`` is rewritten once this process's backend is up); a test that wants more in a
child process says so in the environment it passes.

The flags must be set before JAX is first imported, which is why they live here at the top
of conftest rather than in a fixture.
"""

import os
import re
import shutil
import tempfile
from pathlib import Path

DEVICE_FLAG = "--xla_force_host_platform_device_count"


def with_device_count(flags: str, count: int) -> str:
    """``XLA_FLAGS`` text with the virtual CPU device count set to ``count``."""
    flags = re.sub(rf"{DEVICE_FLAG}=\d+", "", flags).strip()
    return f"{flags} {DEVICE_FLAG}={count}".strip()


os.environ["XLA_FLAGS"] = with_device_count(os.environ.get("XLA_FLAGS", ""), 8)
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiled executables are kept on disk, per user and outside the repository, and shared by
# the test workers, the CLI processes they start and the next run of the suite: most tests
# compile the same tiny steps. JAX_COMPILATION_CACHE_DIR chooses another folder.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        / "kithara-ops"
        / "jax-compilation-cache-tests"
    ),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# Runs the tests make go to a store of their own, never to a server the shell points at.
os.environ["MLFLOW_TRACKING_URI"] = (
    f"sqlite:///{tempfile.mkdtemp(prefix='kithara-tests-')}/mlflow.db"
)
os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)

import jax  # noqa: E402  (after the flags above)
import pytest  # noqa: E402

from kithara_ops import data, models, sharding  # noqa: E402
from kithara_ops._backend import seed_keras  # noqa: E402

EIGHT = jax.devices()  # brings the backend up with 8 devices, before the flag changes
os.environ["XLA_FLAGS"] = with_device_count(os.environ["XLA_FLAGS"], 1)
# Module- and session-scoped fixtures build meshes too, before any test's own fixtures: the
# one-device default is set for the whole process, and a test asking for eight widens it.
sharding.default_devices = lambda: EIGHT[:1]

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
        seed_keras(seed)
        return models.causal_lm("tiny", seq_len=SEQ_LEN, **kwargs)

    return make


@pytest.fixture(scope="session")
def eight_devices():
    """The 8 virtual CPU devices; a Trainer's mesh spans all of them in a test that asks."""
    if len(EIGHT) < 8:
        pytest.skip("needs 8 devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
    return EIGHT


@pytest.fixture(autouse=True)
def _eight_device_mesh_when_asked_for(request, monkeypatch):
    """In a test that asks for ``eight_devices``, meshes built without named devices span all
    eight (a fixture of a wider scope passes ``devices=`` itself)."""
    if "eight_devices" in request.fixturenames:
        monkeypatch.setattr(sharding, "default_devices", lambda: EIGHT)


class _TinyPresets(dict):
    """Tiny KerasHub preset folders by family, each written the first time it is asked for.

    The folders live in a directory every worker of the session shares; a family is written
    once, under a lock, and the other workers read what it wrote.
    """

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, family):
        import fcntl

        import presets

        folder, done = self.root / family, self.root / f"{family}.done"
        with open(self.root / f"{family}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                shutil.rmtree(folder, ignore_errors=True)  # a worker stopped half-way
                presets.build_preset(family, self.root)
                done.touch()
        self[family] = folder
        return folder


@pytest.fixture(scope="session")
def tiny_presets(tmp_path_factory):
    """``{family: preset folder}`` of tiny KerasHub causal LMs (see ``tests/presets.py``).

    Folders are built on first use and shared by the whole session (all its workers); tests
    only read them.
    """
    pytest.importorskip("keras_hub")
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's folder, above each worker's own
    root = shared / "tiny-presets"
    root.mkdir(exist_ok=True)
    return _TinyPresets(root)
