"""``python -m benchmarks [suite ...]``: run benchmarks, print ratio tables, save JSON."""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


SUITES = ("tracking", "step_time", "checkpointing", "resume", "memory", "startup", "lora")
"""Modules of this package, each with ``main(repeats=..., **sizes)`` and ``QUICK`` sizes."""


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("suites", nargs="*", choices=[*SUITES, []], default=list(SUITES))
    parser.add_argument("--repeats", type=positive, default=3, help="interleaved repetitions")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--devices",
        type=positive,
        default=None,
        help="virtual CPU devices (sets XLA_FLAGS); 8 adds the fsdp cases of step_time and lora",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small step counts: a smoke run, not a measurement"
    )
    parser.add_argument(
        "--case",
        action="append",
        dest="cases",
        metavar="NAME",
        help="run only this case of a suite with cases (step_time, checkpointing, lora); repeat",
    )
    args = parser.parse_args()
    if args.devices is not None:
        # Read once, when JAX starts: so before any suite (and JAX) is imported.
        flag = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    from benchmarks.common import write_json

    for name in args.suites or SUITES:
        suite = importlib.import_module(f"benchmarks.{name}")
        sizes = dict(suite.QUICK) if args.quick else {}
        if args.cases:
            sizes["cases"] = tuple(args.cases)
        summary = suite.main(repeats=args.repeats, **sizes)
        print(f"saved {write_json(name, {'summary': summary}, args.output)}")


if __name__ == "__main__":
    main()
