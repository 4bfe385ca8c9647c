"""``python -m benchmarks [suite ...]``: run benchmarks, print ratio tables, save JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import checkpointing, memory, resume, step_time, tracking
from benchmarks.common import write_json

SUITES = {
    "tracking": tracking.main,
    "step_time": step_time.main,
    "checkpointing": checkpointing.main,
    "resume": resume.main,
    "memory": memory.main,
}

QUICK = {
    "tracking": {"steps": 10},
    "step_time": step_time.QUICK,
    "checkpointing": checkpointing.QUICK,
    "resume": resume.QUICK,
    "memory": memory.QUICK,
}
"""Small sizes per suite for ``--quick``: enough to check a suite runs and reports."""


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("suites", nargs="*", choices=[*SUITES, []], default=list(SUITES))
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--quick", action="store_true", help="small step counts: a smoke run, not a measurement"
    )
    args = parser.parse_args()
    for name in args.suites or SUITES:
        sizes = QUICK[name] if args.quick else {}
        summary = SUITES[name](repeats=args.repeats, **sizes)
        print(f"saved {write_json(name, {'summary': summary}, args.output)}")


if __name__ == "__main__":
    main()
