"""MLflow tracking: the run each training becomes, and comparing runs.

``MlflowTracker`` is a ``Callback``; the Trainer adds it when ``config.tracking`` is on.
"""

from kithara_ops.tracking.replay import replay_spool
from kithara_ops.tracking.tracker import MlflowTracker, resolve_experiment
from kithara_ops.tracking.writer import Delivery, RunWriter

__all__ = ["Delivery", "MlflowTracker", "RunWriter", "replay_spool", "resolve_experiment"]
