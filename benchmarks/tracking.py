"""Tracking every step (sqlite and a local HTTP server) against no tracking.

The same model, data, optimizer and seed in every variant; the variants take turns within
each repetition, so drift in the machine's speed affects all of them alike.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import optax
from mlflow import MlflowClient

from benchmarks.common import SteadyClock, print_table, summarise
from kithara_ops import Trainer, data, models
from kithara_ops._backend import seed_keras
from kithara_ops.tracking.server import LocalServer


def run_variant(tracking_uri: str | None, steps: int, batch: int, seq_len: int) -> float:
    """Seconds per steady-state step of one short run, logging every step."""
    seed_keras(0)
    model = models.causal_lm("tiny", seq_len=seq_len)
    batches = data.load("synthetic", seq_len=seq_len, batch_size=batch)
    clock = SteadyClock()
    Trainer(
        model, optax.adamw(1e-3), batches, steps=steps, log_every=1, callbacks=[clock],
        tracking=tracking_uri is not None, tracking_uri=tracking_uri,
        experiment="benchmark-tracking", system_metrics=False,
    ).train()  # fmt: skip
    return clock.step_seconds


QUICK = {"steps": 4}
"""Sizes for a smoke run (``python -m benchmarks tracking --quick``)."""


def main(repeats: int = 3, steps: int = 100, batch: int = 4, seq_len: int = 64) -> dict:
    """Measure and print the tracking ratios; return the summary."""
    with tempfile.TemporaryDirectory() as tmp:
        sqlite_uri = f"sqlite:///{Path(tmp) / 'bench.db'}"
        # Created here so its artifacts stay in the temporary directory, not ./mlruns.
        MlflowClient(sqlite_uri).create_experiment(
            "benchmark-tracking", artifact_location=(Path(tmp) / "artifacts").as_uri()
        )
        server = LocalServer(f"sqlite:///{Path(tmp) / 'server.db'}", Path(tmp) / "artifacts")
        with server:
            variants = {"no tracking": None, "sqlite, every step": sqlite_uri,
                        "http server, every step": server.uri}  # fmt: skip
            samples: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(repeats):
                for name, uri in variants.items():
                    samples[name].append(run_variant(uri, steps, batch, seq_len))
    summary = summarise(samples, baseline="no tracking")
    print_table(
        f"Tracking cost (tiny model, batch {batch} x seq {seq_len}, {steps} steps)", summary
    )
    return summary
