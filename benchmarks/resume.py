"""Time to the first step: resuming from a checkpoint against a fresh run, with and without
JAX's persistent compilation cache.

Each measurement is a new Python process, as a real resume is, so nothing compiled in one
run is reused by the next except through the persistent cache. A process builds the model
and data, then times from the start of ``Trainer(...)`` to its first ``on_step``: setting
up, restoring the checkpoint (resume only), compiling and running one step.

Per repetition and cache setting: a fresh run (``train()``, which saves a checkpoint at its
end), then a resume from that checkpoint (``train(resume=True)``) in a new process. With the
cache on, both processes use one new cache directory: the fresh run fills it (cold), the
resume reads it (warm).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import print_table, summarise
from kithara_ops._backend import seed_keras

QUICK = {"steps": 2, "caches": (True,)}
"""Sizes for a smoke run (``python -m benchmarks resume --quick``): the cached pair only, two
processes instead of four; its baseline is then the fresh run on a cold cache."""

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "fresh run, no cache"


def child(argv: list[str]) -> None:
    """One run in this process; prints its timings as one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint-dir", required=True)
    parser.add_argument("--cache-dir")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args(argv)

    import jax
    import optax

    from kithara_ops import Callback, Trainer, data, models

    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    events: dict[str, int] = {}

    def count(event: str, **_):
        if event.startswith("/jax/compilation_cache/"):
            name = event.rsplit("/", 1)[-1]
            events[name] = events.get(name, 0) + 1

    jax.monitoring.register_event_listener(count)

    class Marks(Callback):
        def __init__(self):
            self.started = self.first_step = self.first_step_number = None

        def on_train_start(self, run):
            self.started = time.perf_counter()

        def on_step(self, record):
            if self.first_step is None:
                self.first_step, self.first_step_number = time.perf_counter(), record.step

    seed_keras(0)
    model = models.causal_lm(args.size, seq_len=args.seq_len)
    batches = data.load("synthetic", seq_len=args.seq_len, batch_size=args.batch, seed=0)
    marks = Marks()
    hits_before = dict(events)
    began = time.perf_counter()
    trainer = Trainer(
        model, optax.adamw(1e-3), batches, steps=args.steps, log_every=args.steps,
        callbacks=[marks], tracking=False, system_metrics=False,
        checkpoint_dir=args.checkpoint_dir,
    )  # fmt: skip
    built = time.perf_counter()
    result = trainer.train(resume=args.resume)
    if trainer.sinks.checkpoints is not None:
        trainer.sinks.checkpoints.close()
    hits = {k: v - hits_before.get(k, 0) for k, v in events.items()}
    report = {
        "to_first_step": marks.first_step - began,
        "construct": built - began,
        "until_train_start": marks.started - built,
        "first_step": marks.first_step - marks.started,
        "compile_seconds": result.compile_seconds,
        "first_step_number": marks.first_step_number,
        "cache_hits": hits.get("cache_hits", 0),
        "cache_misses": hits.get("cache_misses", 0),
    }
    print("RESULT " + json.dumps(report), flush=True)


def run_child(
    checkpoint_dir: Path, cache_dir: Path | None, steps: int, resume: bool, sizes: list[str]
) -> dict:
    """Run ``child`` in a new Python process and return its report."""
    command = [sys.executable, "-m", "benchmarks.resume", "--checkpoint-dir", str(checkpoint_dir)]
    command += ["--steps", str(steps), *sizes]
    if cache_dir is not None:
        command += ["--cache-dir", str(cache_dir)]
    if resume:
        command.append("--resume")
    # The only cache a child uses is the one this benchmark names, never one it inherits.
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"resume benchmark child failed ({done.returncode}): {' '.join(command)}\n"
            f"{done.stderr[-4000:]}"
        )
    return json.loads(lines[-1].removeprefix("RESULT "))


def main(
    repeats: int = 3,
    steps: int = 5,
    size: str = "tiny",
    batch: int = 4,
    seq_len: int = 64,
    caches: tuple[bool, ...] = (False, True),
) -> dict:
    """Measure and print time to first step, fresh and resumed; return the summaries.

    Args:
      repeats: interleaved repetitions.
      steps: steps of the fresh run, which saves a checkpoint at its end; the resume
        continues from it and runs one more step.
      size, batch, seq_len: the model size and the batch shape.
      caches: which settings of the persistent cache to run (``False``: none; ``True``: a new
        cache the fresh run fills and the resume reads).
    """
    sizes = ["--size", size, "--batch", str(batch), "--seq-len", str(seq_len)]
    reports: dict[str, list[dict]] = {}
    for _ in range(repeats):
        for cached in caches:
            with tempfile.TemporaryDirectory() as tmp:
                checkpoints = Path(tmp) / "checkpoints"
                cache = Path(tmp) / "jax-cache" if cached else None
                fresh = run_child(checkpoints, cache, steps, resume=False, sizes=sizes)
                resumed = run_child(checkpoints, cache, steps + 1, resume=True, sizes=sizes)
            if resumed["first_step_number"] != steps + 1:
                raise RuntimeError(f"the resume did not continue from step {steps}: {resumed}")
            label = "cold cache" if cached else "no cache"
            reports.setdefault(f"fresh run, {label}", []).append(fresh)
            label = "warm cache" if cached else "no cache"
            reports.setdefault(f"resume, {label}", []).append(resumed)

    def collect(key: str) -> dict[str, list[float]]:
        return {name: [r[key] for r in runs] for name, runs in reports.items()}

    baseline = BASELINE if BASELINE in reports else "fresh run, cold cache"
    total = summarise(collect("to_first_step"), baseline=baseline)
    parts = {
        part: summarise(collect(part), baseline=baseline)
        for part in ("construct", "until_train_start", "first_step")
    }
    hits = collect("cache_hits")
    where = f"{size} model, batch {batch} x seq {seq_len}, a new process per run"
    print_table(f"Time to first step: Trainer(...) to the first on_step ({where})", total, "s", 1.0)
    print(f"\n{'medians, s':<28} {'Trainer()':>10} {'to start':>10} {'1st step':>10} {'hits':>6}")
    for name in reports:
        cells = [parts[p][name]["median"] for p in parts]
        print(f"{name:<28} " + " ".join(f"{c:>10.2f}" for c in cells) + f" {max(hits[name]):>6}")
    print("(to start: data check, state init or checkpoint restore; 1st step: compile + run)")
    return {"to_first_step_seconds": total, **{f"{p}_seconds": s for p, s in parts.items()},
            "cache_hits": hits}  # fmt: skip


if __name__ == "__main__":
    child(sys.argv[1:])
