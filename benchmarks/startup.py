"""Command-line start-up: wall time of ``kithara-ops --help``, ``--version``, ``train --help``.

Each command runs in a fresh process, as a user types it, and is compared with a bare
``python -c pass`` (the interpreter's own start-up, which no change of ours can remove). The
commands take turns within each repetition, so drift in the machine's speed affects all alike.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

from benchmarks.common import print_table, summarise

BASELINE = "python -c pass"
"""The variant the others are divided by."""

COMMANDS = {
    "kithara-ops --help": ["--help"],
    "kithara-ops --version": ["--version"],
    "kithara-ops train --help": ["train", "--help"],
}
"""Each measured command line, by name, as arguments of ``kithara-ops``."""


def entry_point() -> list[str]:
    """The installed console script, or ``python -m kithara_ops.cli`` where it is absent."""
    script = shutil.which("kithara-ops")
    return [script] if script else [sys.executable, "-m", "kithara_ops.cli"]


def wall_seconds(command: list[str]) -> float:
    """Seconds from starting ``command`` to its exit; raises if it fails."""
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


QUICK = {"runs": 1}
"""Sizes for a smoke run (``python -m benchmarks startup --quick``)."""


def main(repeats: int = 3, runs: int = 5) -> dict:
    """Time each command ``repeats * runs`` times; print and return the summary.

    Args:
        repeats: interleaved repetitions of all the commands.
        runs: runs of each command per repetition (start-up is short, so more samples).
    """
    variants = {BASELINE: [sys.executable, "-c", "pass"]}
    variants |= {name: [*entry_point(), *args] for name, args in COMMANDS.items()}
    # One untimed run of each: the first start-up after an install writes bytecode caches.
    for command in variants.values():
        wall_seconds(command)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, command in variants.items():
            samples[name].extend(wall_seconds(command) for _ in range(runs))
    summary = summarise(samples, baseline=BASELINE)
    print_table("Command-line start-up (wall time of a fresh process)", summary, unit="ms")
    return summary
