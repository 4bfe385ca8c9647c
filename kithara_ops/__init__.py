"""kithara-ops: comparable, resumable, observable fine-tuning runs for Keras 3 models on JAX.

Public API:
  Trainer, TrainResult: the sharded trainer and what ``train()`` returns.
  RunConfig, load_config: the one configuration object of a run.
  Callback, RunInfo: the interface the Trainer reports through.
  ConfigError: raised for bad user input (the CLI exits with code 2 on it).
  CheckpointWriteError: raised when a checkpoint cannot be written (exit code 1).
  Diverged: raised when a run's loss or gradients stopped being finite (exit code 1).
  StoreFailed: raised when the MLflow store became full or read-only (exit code 1).
  describe_optimizer: what a Keras or Optax optimizer is, as a JSON-safe dict.
  resume: continue a checkpointed run, rebuilding it from its saved config.
  TrainingStopped: raised after a clean stop on SIGTERM or Ctrl-C (the state was saved).

The names are loaded on first use (PEP 562), so that ``import kithara_ops`` and the command
line's ``--help`` do not pay for importing JAX, Keras, Optax and MLflow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kithara_ops._backend import require_jax_backend

# Cheap (no Keras import): it only fixes KERAS_BACKEND before anything can import Keras.
require_jax_backend()

from kithara_ops.lazy import lazy_names  # noqa: E402
from kithara_ops.version import __version__  # noqa: E402

_HOMES = {
    "Callback": "kithara_ops.callbacks",
    "CheckpointWriteError": "kithara_ops.errors",
    "ConfigError": "kithara_ops.errors",
    "Diverged": "kithara_ops.errors",
    "StoreFailed": "kithara_ops.errors",
    "RunConfig": "kithara_ops.config",
    "RunInfo": "kithara_ops.callbacks",
    "TrainResult": "kithara_ops.callbacks",
    "Trainer": "kithara_ops.trainer",
    "TrainingStopped": "kithara_ops.interrupt",
    "describe_optimizer": "kithara_ops.optim.describe",
    "load_config": "kithara_ops.config",
    "resume": "kithara_ops.build",
}
"""Each public name and the module that defines it."""

__all__ = [
    "Callback",
    "CheckpointWriteError",
    "ConfigError",
    "Diverged",
    "RunConfig",
    "RunInfo",
    "StoreFailed",
    "TrainResult",
    "Trainer",
    "TrainingStopped",
    "__version__",
    "describe_optimizer",
    "load_config",
    "resume",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from kithara_ops.build import resume
    from kithara_ops.callbacks import Callback, RunInfo, TrainResult
    from kithara_ops.config import RunConfig, load_config
    from kithara_ops.errors import CheckpointWriteError, ConfigError, Diverged
    from kithara_ops.interrupt import TrainingStopped
    from kithara_ops.optim.describe import describe_optimizer
    from kithara_ops.trainer import Trainer


__getattr__, __dir__ = lazy_names("kithara_ops", _HOMES, globals(), __all__)
