"""Shared pieces of the benchmarks: timing a run's steady state and reporting ratios."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from kithara_ops import Callback


class SteadyClock(Callback):
    """Times the steps after the first (which includes compilation) up to the last log.

    The Trainer blocks on the first step's result and fetches metrics at the last step, so
    the interval between the two is real device time, not dispatch time.
    """

    def __init__(self):
        self.start = self.end = None
        self.first_step = self.last_step = 0

    def on_step(self, record):
        if self.start is None:
            self.start, self.first_step = time.perf_counter(), record.step

    def on_log(self, step, metrics):
        self.end, self.last_step = time.perf_counter(), step

    @property
    def step_seconds(self) -> float:
        """Mean seconds per step after the first."""
        return (self.end - self.start) / max(self.last_step - self.first_step, 1)


def summarise(samples: dict[str, list[float]], baseline: str) -> dict[str, dict]:
    """Median, min and max of each variant, and the ratio of medians to ``baseline``."""
    base = statistics.median(samples[baseline])
    return {
        name: {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "ratio": statistics.median(values) / base,
            "repeats": len(values),
        }
        for name, values in samples.items()
    }


def print_table(
    title: str, summary: dict[str, dict], unit: str = "ms/step", scale: float = 1e3
) -> None:
    """A plain-text table of variants, medians (min..max) and ratios."""
    print(f"\n{title}")
    print(f"{'variant':<28} {'median ' + unit:>16} {'min..max':>20} {'ratio':>7}")
    for name, row in summary.items():
        span = f"{row['min'] * scale:.2f}..{row['max'] * scale:.2f}"
        print(f"{name:<28} {row['median'] * scale:>16.2f} {span:>20} {row['ratio']:>7.3f}")


def machine() -> dict:
    """What the numbers were measured on."""
    import os

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
    }


def write_json(name: str, payload: dict, directory: Path) -> Path:
    """Save results as ``<directory>/<name>.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    return path


def check_cases(cases: Sequence[str], known: Mapping[str, Any], steps: int | None) -> None:
    """Refuse case names not in ``known`` and fewer than 3 steps (the first is not timed)."""
    unknown = set(cases) - set(known)
    if unknown:
        raise ValueError(f"unknown case(s) {sorted(unknown)}: choose from {list(known)}.")
    if steps is not None and steps < 3:
        raise ValueError("steps must be at least 3: the first step is not timed.")
