"""MLflow tracking: the run each training becomes, and comparing runs.

``MlflowTracker`` is a ``Callback``; the Trainer adds it when ``config.tracking`` is on.

The names are loaded on first use (PEP 562), so that a light module of this package
(``view``, ``experiments``: what ``kithara-ops ui`` needs) does not pay for importing Keras
and JAX.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kithara_ops.lazy import lazy_names

_HOMES = {
    "Delivery": "kithara_ops.tracking.writer",
    "MlflowTracker": "kithara_ops.tracking.tracker",
    "RunWriter": "kithara_ops.tracking.writer",
    "replay_spool": "kithara_ops.tracking.replay",
    "resolve_experiment": "kithara_ops.tracking.tracker",
}
"""Each public name and the module that defines it."""

__all__ = ["Delivery", "MlflowTracker", "RunWriter", "replay_spool", "resolve_experiment"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from kithara_ops.tracking.replay import replay_spool
    from kithara_ops.tracking.tracker import MlflowTracker, resolve_experiment
    from kithara_ops.tracking.writer import Delivery, RunWriter


__getattr__, __dir__ = lazy_names("kithara_ops.tracking", _HOMES, globals(), __all__)
