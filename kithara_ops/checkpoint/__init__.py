"""Checkpoints: what a run saves, and how it is read back.

- ``checkpointer``: ``Checkpointer``, the sink that saves the train state with Orbax and the
  store a resume reads through; which checkpoints are kept.
- ``record``: ``RunRecord``, what a checkpoint keeps beside the arrays (identity, config,
  optimizer, data position), versioned and migrated.
- ``restore``: the state read back into a template's shardings, verified, migrated or reset.
- ``saved_form``: the on-disk form of typed keys, empty arrays and ordered dicts.
- ``integrity``: checksums of the state's arrays, taken at save and compared at restore.
- ``lock``: the directory lock that keeps a checkpoint directory to one live run.

``from kithara_ops.checkpoint import Checkpointer`` still works; the name loads on first use,
so importing a light module of this package (``record``, ``lock``) does not load Orbax.
"""

from kithara_ops.lazy import lazy_names

__all__ = ["Checkpointer"]

__getattr__, __dir__ = lazy_names(
    __name__, {"Checkpointer": "kithara_ops.checkpoint.checkpointer"}, globals(), __all__
)
