"""Asynchronous checkpoints every N steps against none, and how long each save blocks the loop.

Both variants train the same model on the same data for the same steps; the checkpointing
one saves every ``save_every`` steps into a temporary directory. The steady step time takes
in the saves made inside the timed window (not the final one).

Each call of the Trainer's ``Checkpointer.save`` is also timed on its own, in two parts. A
save must copy the state before the next step consumes (donates) it, so it first waits for
the steps already dispatched to finish: the device is busy meanwhile, so that wait is not
all lost. The wrapper waits for the state first and reports that apart; the rest of the call
(the copy to the host, starting the background write) is the time the loop is blocked.

Cases: ``small-step`` (tiny model, batch 4 x seq 64: a save every 10 steps is a save every
few hundred milliseconds) and ``small`` (batch 8 x seq 128, more compute per step).
"""

from __future__ import annotations

import functools
import tempfile
import time
from collections.abc import Sequence

import jax
import optax

from benchmarks.common import SteadyClock, print_table, summarise
from kithara_ops import Trainer, data, models
from kithara_ops._backend import seed_keras

# name: (model size, batch, seq_len, default steps)
CASES: dict[str, tuple[str, int, int, int]] = {
    "small-step": ("tiny", 4, 64, 60),
    "small": ("small", 8, 128, 30),
}
QUICK = {"cases": ("small-step",), "steps": 12, "save_every": 4}
"""Sizes for a smoke run (``python -m benchmarks checkpointing --quick``)."""


def run_variant(
    save_every: int | None, size: str, steps: int, batch: int, seq_len: int
) -> tuple[float, dict[str, list[float]]]:
    """Seconds per steady step, and the seconds of each in-loop ``save`` call, by part."""
    seed_keras(0)
    model = models.causal_lm(size, seq_len=seq_len)
    batches = data.load("synthetic", seq_len=seq_len, batch_size=batch, seed=0)
    clock = SteadyClock()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            model, optax.adamw(1e-3), batches, steps=steps, log_every=steps, callbacks=[clock],
            tracking=False, system_metrics=False,
            checkpoint_dir=tmp if save_every else None, save_every=save_every,
        )  # fmt: skip
        blocked: dict[str, list[float]] = {"in flight": [], "save": []}
        checkpoints = trainer.sinks.checkpoints
        if checkpoints is not None:
            checkpoints.save = timed(checkpoints.save, blocked, steps)
        trainer.train()
    return clock.step_seconds, blocked


def timed(save, into: dict[str, list[float]], final_step: int):
    """Wrap ``save``: per call before ``final_step``, time the wait for the state, then the call."""

    @functools.wraps(save)
    def wrapper(step, state, record):
        began = time.perf_counter()
        jax.block_until_ready(state)
        ready = time.perf_counter()
        save(step, state, record)
        if step < final_step:
            into["in flight"].append(ready - began)
            into["save"].append(time.perf_counter() - ready)

    return wrapper


def measure_case(name: str, repeats: int, steps: int | None, save_every: int) -> dict:
    """Interleaved runs with and without saves on one case; the case's summaries."""
    size, batch, seq_len, default_steps = CASES[name]
    steps = steps or default_steps
    if steps <= save_every:
        raise ValueError("steps must exceed save_every so saves fall inside the timed steps.")
    with_saves = f"async save every {save_every}"
    steady: dict[str, list[float]] = {"no checkpoints": [], with_saves: []}
    in_flight: list[float] = []
    blocked: list[float] = []
    for _ in range(repeats):
        step_seconds, _ = run_variant(None, size, steps, batch, seq_len)
        steady["no checkpoints"].append(step_seconds)
        step_seconds, saves = run_variant(save_every, size, steps, batch, seq_len)
        steady[with_saves].append(step_seconds)
        in_flight.extend(saves["in flight"])
        blocked.extend(saves["save"])
    step_summary = summarise(steady, baseline="no checkpoints")
    # Each part of a save against one steady step without checkpoints: steps' worth.
    save_summary = summarise(
        {
            "step, no checkpoints": steady["no checkpoints"],
            "wait for steps in flight": in_flight,
            "save() call, blocked": blocked,
        },
        baseline="step, no checkpoints",
    )
    where = f"{size} model, batch {batch} x seq {seq_len}, {steps} steps"
    print_table(f"Checkpointing cost, {name} ({where})", step_summary)
    print_table(f"Per save ({len(blocked)} saves; ratio = steps' worth)", save_summary, "ms")
    return {"model": size, "step_seconds": step_summary, "save_blocked_seconds": save_summary}


def main(
    repeats: int = 3,
    cases: Sequence[str] = tuple(CASES),
    steps: int | None = None,
    save_every: int = 10,
) -> dict:
    """Measure and print the checkpointing ratios of each case; return the summaries by case.

    Args:
      repeats: interleaved repetitions of both variants.
      cases: names of ``CASES`` to run.
      steps: steps per run, overriding each case's default (must exceed ``save_every``).
      save_every: steps between saves.
    """
    unknown = set(cases) - set(CASES)
    if unknown:
        raise ValueError(f"unknown case(s) {sorted(unknown)}: choose from {list(CASES)}.")
    return {name: measure_case(name, repeats, steps, save_every) for name in cases}
