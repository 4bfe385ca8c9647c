"""Optimizers of both families behind one adapter (see ``adapter.py``)."""

from kithara_ops.optim.adapter import OptimizerAdapter
from kithara_ops.optim.family import as_adapter

__all__ = ["OptimizerAdapter", "as_adapter"]
