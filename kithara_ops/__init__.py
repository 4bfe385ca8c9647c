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
"""

from kithara_ops._backend import require_jax_backend

require_jax_backend()

from kithara_ops.build import resume  # noqa: E402
from kithara_ops.callbacks import Callback, RunInfo, TrainResult  # noqa: E402
from kithara_ops.config import RunConfig, load_config  # noqa: E402
from kithara_ops.errors import CheckpointWriteError, ConfigError, Diverged, StoreFailed  # noqa: E402
from kithara_ops.interrupt import TrainingStopped  # noqa: E402
from kithara_ops.optim.describe import describe_optimizer  # noqa: E402
from kithara_ops.trainer import Trainer  # noqa: E402

__version__ = "0.1.0"

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
