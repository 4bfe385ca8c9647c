"""LoRA on a KerasHub preset: the Trainer's step time and its device memory under fsdp.

A small Gemma causal LM (4 layers, hidden 256, a vocabulary of 1024: 2.6M weights) is built
from config, seeded, and written with ``save_to_preset`` into a temporary folder: no network
and no tokenizer are needed, the batches are token ids. Every run loads it with
``kithara_ops.models.from_preset(folder, lora_rank=4)`` (onto the run's mesh under fsdp, as
the command line does), so the base weights are frozen and only the adapters train.

Step time: the Trainer (Optax AdamW) against the hand-written ``jax.jit`` loop of
``benchmarks.reference`` on the same preset: ``stateless_call`` with the adapters as the
trainable variables and the frozen base passed as non-trainable, Optax AdamW on the adapters,
the same batches and, under fsdp, the same shardings. The variants take turns, first and
second, in successive repeats; the first step (tracing, compilation, one run) is timed apart.

Memory: after a Trainer run under fsdp, the bytes each device holds of the Trainer's state
(the sum, over the state's arrays, of the shards on that device; the largest device counts)
against ``(frozen / devices + adapters + optimizer state) x 1.10``. The host CPU platform
reports no device memory statistics, so this is counted from the arrays' shardings
(``kithara_ops.sharding.local_shard_bytes``), not read from an allocator.
"""

from __future__ import annotations

import dataclasses
import gc
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import keras

from benchmarks import reference
from benchmarks.common import SteadyClock, check_cases, print_table, summarise
from benchmarks.step_time import host_batches, optax_adamw
from kithara_ops import Trainer
from kithara_ops._backend import seed_keras
from kithara_ops.models import from_preset, layout_rules_of
from kithara_ops.sharding import (
    batch_sharding,
    local_shard_bytes,
    make_mesh,
    parameter_shardings,
    replicated,
)
from kithara_ops.state import variable_keys

LORA_RANK = 4
MEMORY_SLACK = 1.10
"""The bound's allowance over frozen / devices + adapters + optimizer state."""

SHAPE = dict(
    vocabulary_size=1024, num_layers=4, num_query_heads=4, num_key_value_heads=2,
    hidden_dim=256, intermediate_dim=1024, head_dim=64,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Case:
    """One setting: batch shape, steps, and devices (several: fsdp over all of them)."""

    batch: int
    seq_len: int
    steps: int
    devices: int = 1


CASES: dict[str, Case] = {
    "gemma lora": Case(8, 128, 15),
    "gemma lora fsdp x8": Case(8, 128, 10, devices=8),
}
QUICK = {"steps": 4}
"""Sizes for a smoke run (``python -m benchmarks lora --quick``)."""

BASELINE = "reference (jit loop)"
TRAINER = "Trainer optax.adamw"


def build_preset(directory: Path) -> Path:
    """Write the benchmark's Gemma preset (seed 0, no preprocessor) and return its folder."""
    import keras_hub

    seed_keras(0)
    backbone = keras_hub.models.GemmaBackbone(**SHAPE)
    folder = directory / "gemma"
    keras_hub.models.GemmaCausalLM(backbone, preprocessor=None).save_to_preset(str(folder))
    return folder


def load(folder: Path, mesh: jax.sharding.Mesh | None) -> keras.Model:
    """The preset with LoRA enabled; seeded, so every run starts from the same adapters."""
    seed_keras(0)
    # Seeded here, so the Trainer and the reference loop start from the same adapters.
    return from_preset(str(folder), lora_rank=LORA_RANK, mesh=mesh, seed=0)


def model_inputs(batch):
    """What the Trainer feeds a KerasHub causal LM: token ids and an all-ones padding mask."""
    return {"token_ids": batch["x"], "padding_mask": jnp.ones_like(batch["x"])}


def run_reference(folder: Path, case: Case, batches: list) -> dict:
    """One run of the hand-written loop: step and first-step seconds, compilations, loss."""
    mesh = make_mesh("fsdp", devices=jax.devices()[: case.devices]) if case.devices > 1 else None
    model = load(folder, mesh)
    placement: dict = {}
    if mesh is not None:
        # The Trainer's placement: one set of layout rules for adapters and frozen weights,
        # the dropout seed states replicated.
        rules = layout_rules_of(model)

        def shardings(variables):
            keys = variable_keys(variables)
            shapes = {k: tuple(v.shape) for k, v in zip(keys, variables)}
            frozen = {k: s for k, s in shapes.items() if not k.endswith("seed_generator_state")}
            by_key = parameter_shardings(mesh, frozen, rules)
            return [by_key.get(k, replicated(mesh)) for k in keys]

        placement = {
            "param_shardings": shardings(model.trainable_variables),
            "non_trainable_shardings": shardings(model.non_trainable_variables),
            "batch_sharding": batch_sharding(mesh),
        }
    result = reference.train(model, optax_adamw(), batches, inputs=model_inputs, **placement)
    return {
        "step_seconds": result.step_seconds,
        "first_step_seconds": result.first_step_seconds,
        "compilations": result.compilations,
        "loss": result.loss,
    }


def run_trainer(folder: Path, case: Case, batches: list, memory: dict | None = None) -> dict:
    """One Trainer run, measured like ``run_reference``; fills ``memory`` (``state_memory``)."""
    devices = jax.devices()[: case.devices]
    sharded = case.devices > 1
    model = load(folder, make_mesh("fsdp", devices=devices) if sharded else None)
    clock = SteadyClock()
    trainer = Trainer(
        model, optax_adamw(), batches, steps=len(batches), log_every=len(batches),
        callbacks=[clock], tracking=False, system_metrics=False,
        sharding="fsdp" if sharded else "dp", devices=devices,
    )  # fmt: skip
    result = trainer.train()
    if memory is not None:
        memory.update(state_memory(trainer.state, len(devices)))
    return {
        "step_seconds": clock.step_seconds,
        "first_step_seconds": result.compile_seconds,
        "compilations": trainer.steps.train_step._cache_size(),
        "loss": result.loss,
    }


def per_device_bytes(arrays) -> dict:
    """Bytes of ``arrays``' shards held by each device (a replicated array counts on each).

    A buffer two arrays share (the state's frozen weights and the Keras variables they were
    placed from) counts once.
    """
    held: dict = defaultdict(int)
    seen = set()
    for array in arrays:
        sizes = local_shard_bytes(array)
        # Only a fully addressable array's shards can always be listed (see
        # local_shard_bytes); one that spans processes counts as buffers of its own.
        if array.is_fully_addressable:
            buffers = [(s.device, s.data.unsafe_buffer_pointer()) for s in array.addressable_shards]
        else:
            buffers = [(device, id(array)) for device in sizes]
        for device, pointer in buffers:
            if (device, pointer) not in seen:
                seen.add((device, pointer))
                held[device] += sizes[device]
    return held


def state_memory(state, devices: int) -> dict:
    """The largest device's bytes of ``state`` and of all live arrays, and the bound."""
    nbytes = lambda tree: sum(leaf.nbytes for leaf in jax.tree.leaves(tree))  # noqa: E731
    frozen, adapters, opt = (
        nbytes(state.non_trainable),
        nbytes(state.params),
        nbytes(state.opt_state),
    )
    bound = (frozen / devices + adapters + opt) * MEMORY_SLACK
    held = max(per_device_bytes(jax.tree.leaves(state)).values())
    gc.collect()
    live = max(per_device_bytes(jax.live_arrays()).values())
    return {
        "frozen_bytes": frozen, "adapter_bytes": adapters, "optimizer_state_bytes": opt,
        "devices": devices, "bound_bytes": bound, "state_bytes_per_device": held,
        "live_bytes_per_device": live, "ratio": held / bound,
    }  # fmt: skip


def measure_case(folder: Path, name: str, repeats: int, steps: int | None) -> dict:
    """Interleaved repeats of the reference and the Trainer on one case; its summaries."""
    case = CASES[name]
    steps = steps or case.steps
    batches = host_batches(case.batch, case.seq_len, steps)
    runs: dict[str, list[dict]] = {BASELINE: [], TRAINER: []}
    memory: dict | None = {} if case.devices > 1 else None
    for repeat in range(repeats):
        # The order alternates, so a machine that speeds up or slows down over a repeat
        # (other jobs on shared cores) favours neither variant.
        order = [BASELINE, TRAINER] if repeat % 2 == 0 else [TRAINER, BASELINE]
        for variant in order:
            if variant == BASELINE:
                runs[variant].append(run_reference(folder, case, batches))
            else:
                runs[variant].append(run_trainer(folder, case, batches, memory))

    def collect(key: str) -> dict[str, list]:
        return {variant: [run[key] for run in values] for variant, values in runs.items()}

    step = summarise(collect("step_seconds"), baseline=BASELINE)
    first = summarise(collect("first_step_seconds"), baseline=BASELINE)
    where = f"Gemma preset, LoRA rank {LORA_RANK}, batch {case.batch} x seq {case.seq_len}"
    where += f", {steps} steps" + (
        f", fsdp over {case.devices} devices" if case.devices > 1 else ""
    )
    print_table(f"LoRA step time, {name} ({where}): steady steps", step)
    print_table(f"LoRA step time, {name}: first step (trace + compile + run)", first, "s", 1.0)
    compilations = collect("compilations")
    losses = {v: [float(x) for x in values] for v, values in collect("loss").items()}
    print(
        "train-step compilations per run: "
        + ", ".join(f"{v}={'/'.join(map(str, c))}" for v, c in compilations.items())
    )
    print("last loss: " + ", ".join(f"{v}={x[-1]:.4f}" for v, x in losses.items()))
    summary = {
        "batch": case.batch, "seq_len": case.seq_len, "steps": steps, "devices": case.devices,
        "step_seconds": step, "first_step_seconds": first, "compilations": compilations,
        "last_loss": losses,
    }  # fmt: skip
    if memory:
        print_memory(memory)
        summary["memory"] = memory
    return summary


def print_memory(memory: dict) -> None:
    """The memory table: bytes on the fullest device against the bound."""
    n = memory["devices"]
    print(
        f"\nLoRA device memory under fsdp over {n} devices, counted from array shards "
        "(sized by the arrays' shardings; the CPU platform reports no device memory statistics)"
    )
    print(f"{'variant':<44} {'MB':>10} {'ratio':>7}")
    rows = [
        (f"bound: (frozen/{n} + adapters + opt) x {MEMORY_SLACK:.2f}", memory["bound_bytes"]),
        ("Trainer state, fullest device", memory["state_bytes_per_device"]),
        ("all live arrays, fullest device", memory["live_bytes_per_device"]),
    ]
    for label, value in rows:
        print(f"{label:<44} {value / 1e6:>10.3f} {value / memory['bound_bytes']:>7.3f}")
    print(
        f"frozen {memory['frozen_bytes'] / 1e6:.3f} MB, adapters "
        f"{memory['adapter_bytes'] / 1e6:.3f} MB, optimizer state "
        f"{memory['optimizer_state_bytes'] / 1e6:.3f} MB (whole arrays)"
    )


def main(repeats: int = 3, cases: Sequence[str] = tuple(CASES), steps: int | None = None) -> dict:
    """Measure and print the LoRA step-time ratios and fsdp memory; return them by case.

    Args:
      repeats: interleaved repetitions of both variants.
      cases: names of ``CASES`` to run (the fsdp case only where 8 devices are there).
      steps: steps per run (at least 3), overriding each case's default.
    """
    check_cases(cases, CASES, steps)
    try:
        import keras_hub  # noqa: F401
    except ImportError:
        print("skipped lora: needs KerasHub (pip install 'kithara-ops[hub]')")
        return {}
    runnable = [name for name in cases if CASES[name].devices <= jax.device_count()]
    for name in sorted(set(cases) - set(runnable)):
        print(f"skipped {name}: needs {CASES[name].devices} devices (--devices N)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_preset(Path(tmp))
        return {name: measure_case(folder, name, repeats, steps) for name in runnable}
