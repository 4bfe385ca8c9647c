"""Steady-state step time: the Trainer against a hand-written loop and ``keras.Model.fit``.

Every variant trains a freshly built model with the same seed, on the same host batches,
with AdamW of the same hyperparameters; only the loop around the step differs. The
hand-written loop (``benchmarks.reference``) is the floor and the baseline of the ratios.
The first step (tracing, compilation and one run) is timed apart from the steady steps.

Cases: ``small-step`` (tiny model, batch 4 x seq 64) is where host overhead per step shows;
``tiny`` and ``small`` (batch 8 x seq 128) have more compute per step; the ``fsdp x8`` cases
shard them over 8 devices and run only when 8 are there (``python -m benchmarks --devices 8``).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import keras
import numpy as np
import optax

from benchmarks import reference
from benchmarks.common import SteadyClock, check_cases, print_table, summarise
from kithara_ops import Trainer, data, models
from kithara_ops._backend import seed_keras
from kithara_ops.models import layout_rules_of
from kithara_ops.sharding import batch_sharding, make_mesh, parameter_shardings


@dataclasses.dataclass(frozen=True)
class Case:
    """One measurement setting: a built-in model, a batch shape, steps and devices.

    One device trains unsharded; several train with ``fsdp`` over all of them (the
    hand-written loop places its arrays like the Trainer does, and ``fit`` is left out: it
    would need a ``keras.distribution`` of its own).
    """

    size: str
    batch: int
    seq_len: int
    steps: int
    devices: int = 1


CASES: dict[str, Case] = {
    "small-step": Case("tiny", 4, 64, 100),
    "tiny": Case("tiny", 8, 128, 50),
    "small": Case("small", 8, 128, 15),
    "tiny fsdp x8": Case("tiny", 8, 128, 30, devices=8),
    "small fsdp x8": Case("small", 8, 128, 10, devices=8),
}
QUICK = {"cases": ("small-step", "tiny fsdp x8"), "steps": 5}
"""Sizes for a smoke run (``python -m benchmarks step_time --quick``)."""

LEARNING_RATE, WEIGHT_DECAY, BETA_1, BETA_2, EPSILON = 1e-3, 0.01, 0.9, 0.999, 1e-8
BASELINE = "reference (optax)"


def optax_adamw() -> optax.GradientTransformation:
    return optax.adamw(LEARNING_RATE, b1=BETA_1, b2=BETA_2, eps=EPSILON, weight_decay=WEIGHT_DECAY)


def keras_adamw() -> keras.optimizers.Optimizer:
    return keras.optimizers.AdamW(
        learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        beta_1=BETA_1,
        beta_2=BETA_2,
        epsilon=EPSILON,
    )


def fresh_model(size: str, seq_len: int) -> keras.Model:
    seed_keras(0)
    return models.causal_lm(size, seq_len=seq_len)


def host_batches(batch: int, seq_len: int, steps: int) -> list[dict[str, np.ndarray]]:
    """The first ``steps`` batches of the synthetic data, seed 0, as numpy arrays."""
    iterator = iter(data.load("synthetic", seq_len=seq_len, batch_size=batch, seed=0))
    return [{k: np.array(v) for k, v in next(iterator).items()} for _ in range(steps)]


# ---------------------------------------------------------------------------- variants
# Each takes (case, batches) and returns step seconds, first-step seconds,
# the number of compilations of the train step (None where it cannot be read) and the loss.
Outcome = dict[str, float | int | None]


def run_reference(case: Case, batches: list) -> Outcome:
    model = fresh_model(case.size, case.seq_len)
    param_shardings = batch_place = None
    if case.devices > 1:
        mesh = make_mesh("fsdp", devices=jax.devices()[: case.devices])
        shapes = {v.path: tuple(v.shape) for v in model.trainable_variables}
        by_path = parameter_shardings(mesh, shapes, layout_rules_of(model))
        param_shardings = [by_path[v.path] for v in model.trainable_variables]
        batch_place = batch_sharding(mesh)
    result = reference.train(model, optax_adamw(), batches, param_shardings, batch_place)
    return {
        "step_seconds": result.step_seconds,
        "first_step_seconds": result.first_step_seconds,
        "compilations": result.compilations,
        "loss": result.loss,
    }


def run_trainer(optimizer: Callable) -> Callable[[Case, list], Outcome]:
    def run(case: Case, batches: list) -> Outcome:
        clock = SteadyClock()
        trainer = Trainer(
            fresh_model(case.size, case.seq_len), optimizer(), batches, steps=len(batches),
            log_every=len(batches), callbacks=[clock], tracking=False, system_metrics=False,
            sharding="fsdp" if case.devices > 1 else "dp", devices=jax.devices()[: case.devices],
        )  # fmt: skip
        result = trainer.train()
        return {
            "step_seconds": clock.step_seconds,
            "first_step_seconds": result.compile_seconds,
            "compilations": trainer.steps.train_step._cache_size(),
            "loss": result.loss,
        }

    return run


class FitClock(keras.callbacks.Callback):
    """Times ``fit``'s batches after the first, like ``SteadyClock`` does for the Trainer.

    Keras hands batch-end events to worker threads when every callback is ``async_safe``;
    a worker converts the step's logs to floats (waiting for the step) before calling this,
    so each timestamp is that of a finished step and the loop itself is not slowed. Workers
    may run out of order, hence the timestamps by batch number.
    """

    async_safe = True

    def __init__(self):
        super().__init__()
        self.begin = None
        self.times: dict[int, float] = {}
        self.losses: dict[int, float] = {}

    def on_train_begin(self, logs=None):
        self.begin = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times[batch] = time.perf_counter()
        self.losses[batch] = (logs or {}).get("loss")

    @property
    def first_step_seconds(self) -> float:
        return self.times[min(self.times)] - self.begin

    @property
    def step_seconds(self) -> float:
        first, last = min(self.times), max(self.times)
        return (self.times[last] - self.times[first]) / max(last - first, 1)

    @property
    def loss(self) -> float | None:
        return self.losses[max(self.losses)]


def fit(model: keras.Model, batches: list) -> FitClock:
    model.compile(
        optimizer=keras_adamw(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x = np.concatenate([b["x"] for b in batches])
    y = np.concatenate([b["y"] for b in batches])
    clock = FitClock()
    model.fit(
        x, y, batch_size=len(batches[0]["x"]), epochs=1, steps_per_epoch=len(batches),
        shuffle=False, verbose=0, callbacks=[clock],
    )  # fmt: skip
    return clock


def fit_outcome(clock: FitClock) -> Outcome:
    return {
        "step_seconds": clock.step_seconds,
        "first_step_seconds": clock.first_step_seconds,
        "compilations": None,
        "loss": clock.loss,
    }


def run_fit(case: Case, batches: list) -> Outcome:
    return fit_outcome(fit(fresh_model(case.size, case.seq_len), batches))


def run_fit_autolog(case: Case, batches: list) -> Outcome:
    """``fit`` under ``mlflow.keras.autolog`` into a throwaway sqlite store."""
    import mlflow
    import mlflow.keras

    model = fresh_model(case.size, case.seq_len)
    was_set, previous = mlflow.is_tracking_uri_set(), mlflow.get_tracking_uri()
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{Path(tmp) / 'autolog.db'}")
        try:
            experiment = mlflow.create_experiment(
                "benchmark-step-time", artifact_location=(Path(tmp) / "artifacts").as_uri()
            )
            mlflow.keras.autolog(log_models=False, silent=True)
            with mlflow.start_run(experiment_id=experiment):
                clock = fit(model, batches)
        finally:
            mlflow.keras.autolog(disable=True, silent=True)
            while mlflow.active_run() is not None:
                mlflow.end_run()
            mlflow.set_tracking_uri(previous if was_set else None)
            if previous_env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = previous_env
    return fit_outcome(clock)


VARIANTS: dict[str, Callable[[Case, list], Outcome]] = {
    BASELINE: run_reference,
    "Trainer optax.adamw": run_trainer(optax_adamw),
    "Trainer keras AdamW": run_trainer(keras_adamw),
    "keras.Model.fit": run_fit,
    "keras.Model.fit + autolog": run_fit_autolog,
}


def measure_case(name: str, repeats: int, steps: int | None) -> dict:
    """Interleaved repetitions of every variant on one case; the case's summaries."""
    case = CASES[name]
    size, batch, seq_len = case.size, case.batch, case.seq_len
    steps = steps or case.steps
    batches = host_batches(batch, seq_len, steps)
    variants = {v: run for v, run in VARIANTS.items() if case.devices == 1 or "fit" not in v}
    outcomes: dict[str, list[Outcome]] = {variant: [] for variant in variants}
    for _ in range(repeats):
        for variant, run in variants.items():
            outcomes[variant].append(run(case, batches))

    def collect(key: str) -> dict[str, list]:
        return {v: [o[key] for o in runs] for v, runs in outcomes.items()}

    step = summarise(collect("step_seconds"), baseline=BASELINE)
    first = summarise(collect("first_step_seconds"), baseline=BASELINE)
    compilations = {v: c for v, c in collect("compilations").items() if None not in c}
    losses = {
        v: [float(x) for x in values if x is not None] for v, values in collect("loss").items()
    }

    where = f"{size} model, batch {batch} x seq {seq_len}, {steps} steps"
    if case.devices > 1:
        where += f", fsdp over {case.devices} devices"
    print_table(f"Step time, {name} ({where}): steady steps", step)
    print_table(f"Step time, {name}: first step (trace + compile + run)", first, "s", 1.0)
    print(
        "train-step compilations per run: "
        + ", ".join(f"{v}={'/'.join(map(str, c))}" for v, c in compilations.items())
    )
    recompiled = {v: c for v, c in compilations.items() if any(n != 1 for n in c)}
    if recompiled:
        print(f"WARNING: a train step compiled more than once: {recompiled}")
    print(
        "last loss (fit: its running mean over the epoch): "
        + ", ".join(f"{v}={x[0]:.4f}" for v, x in losses.items() if x)
    )
    return {
        "model": size, "batch": batch, "seq_len": seq_len, "steps": steps,
        "devices": case.devices,
        "step_seconds": step, "first_step_seconds": first,
        "compilations": compilations, "last_loss": losses,
    }  # fmt: skip


def main(repeats: int = 3, cases: Sequence[str] = tuple(CASES), steps: int | None = None) -> dict:
    """Measure and print the step-time ratios of each case; return the summaries by case.

    Args:
      repeats: interleaved repetitions of every variant.
      cases: names of ``CASES`` to run.
      steps: steps per run (at least 3), overriding each case's default.
    """
    check_cases(cases, CASES, steps)
    runnable = [name for name in cases if CASES[name].devices <= jax.device_count()]
    for name in sorted(set(cases) - set(runnable)):
        print(f"skipped {name}: needs {CASES[name].devices} devices (--devices N)")
    return {name: measure_case(name, repeats, steps) for name in runnable}
