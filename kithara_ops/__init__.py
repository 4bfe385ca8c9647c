"""kithara-ops: comparable, resumable, observable fine-tuning runs for Keras 3 models on JAX.

Public API:
  Trainer, TrainResult: the sharded trainer and what ``train()`` returns.
  RunConfig, load_config: the one configuration object of a run.
  Callback, RunInfo: the interface the Trainer reports through.
  ConfigError: raised for bad user input (the CLI exits with code 2 on it).
  describe_optimizer: what a Keras or Optax optimizer is, as a JSON-safe dict.
"""

from kithara_ops._backend import require_jax_backend

require_jax_backend()

from kithara_ops.callbacks import Callback, RunInfo, TrainResult  # noqa: E402
from kithara_ops.config import RunConfig, load_config  # noqa: E402
from kithara_ops.errors import ConfigError  # noqa: E402
from kithara_ops.optim.describe import describe_optimizer  # noqa: E402
from kithara_ops.trainer import Trainer  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Callback",
    "ConfigError",
    "RunConfig",
    "RunInfo",
    "TrainResult",
    "Trainer",
    "__version__",
    "describe_optimizer",
    "load_config",
]
