"""A profiler window: a JAX profiler trace of steps START to END, and the compiled train
step's HLO text and cost analysis, kept with the run.

The trace starts before step START runs (after step START-1 has been handed on) and stops
once step END's results are on the host, so the window holds whole steps and nothing else.
The files (``plugins/profile/...`` as TensorBoard and Perfetto read them,
``train_step.hlo.txt.gz``, ``train_step.cost.json``) are written to a folder of their own
and handed to the other sinks (``Callback.on_artifacts``): the tracker logs them under
``profile/``. The folder is left on disk, its path printed.
"""

from __future__ import annotations

import gzip
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from kithara_ops.callbacks import Callback
from kithara_ops.config.checks import window

PROFILE_ARTIFACTS = "profile"


class Profiler(Callback):
    """Traces the steps of ``window`` (``"START:END"``) and hands the files to ``publish``."""

    def __init__(self, steps: str, publish: Callable[[str, str], None] = lambda *_: None):
        self.start, self.end = window(steps)
        self.publish = publish
        self.folder: Path | None = None
        self._tracing = False
        self._run: Any = None

    def on_train_start(self, run) -> None:
        self._run = run
        if run.start_step < self.end and run.start_step >= self.start - 1:
            self._begin()

    def on_step(self, record) -> None:
        if record.step == self.start - 1 and not self._tracing and self.folder is None:
            self._begin()
        elif self._tracing and (
            record.step >= min(self.end, self._run.total_steps) or record.stopping
        ):
            jax.block_until_ready(record.state)  # the window's steps have run on the devices
            self._finish()

    def on_train_end(self, status, result) -> None:
        if self._tracing:  # the run failed inside the window: the trace is kept on disk
            self._finish()

    def _begin(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="kithara-profile-"))
        jax.profiler.start_trace(str(self.folder))
        self._tracing = True

    def _finish(self) -> None:
        jax.profiler.stop_trace()
        self._tracing = False
        self._write_step(self.folder)
        print(f"profile of steps {self.start}:{self.end}: {self.folder}", file=sys.stderr)
        self.publish(str(self.folder), PROFILE_ARTIFACTS)

    def _write_step(self, folder: Path) -> None:
        """The compiled train step as HLO text (gzipped) and XLA's cost analysis."""
        lower = getattr(self._run, "lower_train_step", None)
        try:
            compiled = lower().compile()
        except Exception as err:  # no step ran, or the backend cannot say: the trace stays
            print(f"Warning: the train step's HLO was not kept: {err}", file=sys.stderr)
            return
        with gzip.open(folder / "train_step.hlo.txt.gz", "wt", encoding="utf-8") as out:
            out.write(compiled.as_text())
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) and cost else cost or {}
        values = {k: float(v) for k, v in dict(cost).items() if isinstance(v, int | float)}
        (folder / "train_step.cost.json").write_text(json.dumps(values, indent=1, sort_keys=True))
