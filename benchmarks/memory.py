"""Device memory at steady state against what training needs, and its growth over a run.

A callback sums the bytes of every live JAX array (after ``gc.collect()``) at an early and a
late step. What training needs is the train state (parameters, optimizer state, step, key)
plus one batch. The live arrays are also split by owner: the train state, the Keras model's
and the Keras optimizer's own variables (none while the Trainer trains: it parks their values
in host memory), and the rest: batches in flight, metrics, and anything else alive, such as
device copies JAX keeps of arrays a compiled function closed over.

``benchmarks.fitting`` adds the memory plan against these runs, rematerialisation's memory and
time, bfloat16 and a quantized LoRA base.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import jax
import keras
import numpy as np
import optax

from benchmarks import fitting
from benchmarks.common import print_table, summarise
from kithara_ops import Callback, Trainer, data, models
from kithara_ops._backend import seed_keras

QUICK = {"steps": 30, "early": 10}
"""Sizes for a smoke run (``python -m benchmarks memory --quick``)."""

OPTIMIZERS: dict[str, Callable] = {
    "optax.adamw": lambda: optax.adamw(1e-3),
    "keras AdamW": lambda: keras.optimizers.AdamW(1e-3),
}


def nbytes(tree) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


class LiveBytes(Callback):
    """Records the bytes of live arrays, by owner, at the given steps."""

    def __init__(self, trainer_ref: list, steps: tuple[int, ...]):
        self.trainer_ref = trainer_ref
        self.steps = steps
        self.at: dict[int, dict[str, int]] = {}

    def on_step(self, record):
        step, state = record.step, record.state
        if step not in self.steps:
            return
        gc.collect()
        jax.block_until_ready(state)
        trainer = self.trainer_ref[0]
        owners = {
            "train state": {id(x) for x in jax.tree.leaves(state)},
            "keras model variables": {id(v.value) for v in trainer.model.variables},
            "keras optimizer variables": {id(v.value) for v in trainer.adapter.variables},
        }
        split = dict.fromkeys([*owners, "other"], 0)
        for array in jax.live_arrays():
            owner = next((name for name, ids in owners.items() if id(array) in ids), "other")
            split[owner] += array.nbytes
        self.at[step] = {"total": sum(split.values()), **split}


def run_variant(optimizer: Callable, steps: int, early: int, batch: int, seq_len: int) -> dict:
    """Live bytes at ``early`` and at the last step, and what the run needs."""
    gc.collect()
    seed_keras(0)
    model = models.causal_lm("tiny", seq_len=seq_len)
    batches = data.load("synthetic", seq_len=seq_len, batch_size=batch, seed=0)
    trainer_ref: list = []
    probe = LiveBytes(trainer_ref, (early, steps))
    trainer = Trainer(
        model, optimizer(), batches, steps=steps, log_every=steps, callbacks=[probe],
        tracking=False, system_metrics=False,
    )  # fmt: skip
    trainer_ref.append(trainer)
    trainer.train()
    one_batch = sum(np.asarray(v).nbytes for v in next(iter(batches)).values())
    needed = nbytes(trainer.state) + one_batch
    return {"needed": needed, "early": probe.at[early], "late": probe.at[steps]}


def main(
    repeats: int = 3, steps: int = 500, early: int = 50, batch: int = 4, seq_len: int = 64
) -> dict:
    """Measure and print live device bytes against need, and growth; return the summaries."""
    if not 1 <= early < steps:
        raise ValueError("early must be a step before the last one.")
    runs: dict[str, list[dict]] = {name: [] for name in OPTIMIZERS}
    for _ in range(repeats):
        for name, optimizer in OPTIMIZERS.items():
            runs[name].append(run_variant(optimizer, steps, early, batch, seq_len))

    result = {}
    where = f"tiny model, batch {batch} x seq {seq_len}"
    for name, samples in runs.items():
        steady = summarise(
            {
                "params + opt state + batch": [s["needed"] for s in samples],
                f"live at step {steps}": [s["late"]["total"] for s in samples],
            },
            baseline="params + opt state + batch",
        )
        growth = summarise(
            {
                f"live at step {early}": [s["early"]["total"] for s in samples],
                f"live at step {steps}": [s["late"]["total"] for s in samples],
            },
            baseline=f"live at step {early}",
        )
        split = samples[-1]["late"]
        print_table(f"Live device memory, {name} ({where})", steady, "MB", 1e-6)
        print_table(f"Growth, {name} (step {early} to {steps})", growth, "MB", 1e-6)
        print(
            f"live at step {steps} by owner: "
            + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in split.items() if k != "total")
        )
        result[name] = {"steady_bytes": steady, "growth_bytes": growth, "live_by_owner": split}
    needed = [float(s["needed"]) for s in runs["optax.adamw"]]
    result["fitting"] = fitting.main(needed, min(steps, 50), batch, seq_len)
    return result
