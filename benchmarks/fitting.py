"""What makes a model fit, measured: the memory plan against the bytes a run places, the
rematerialisation trade-off, bfloat16, and a quantized LoRA base (part of the ``memory`` suite).

- plan / placed: the plan's state and batch bytes (``kithara_ops.plan``, from abstract shapes)
  against what a run of the same config really holds (``memory.run_variant``'s ``needed``);
- remat full / none: the plan's temporaries and the steady step time of the built-in model;
- bfloat16 / float32: the plan's state bytes;
- int8 / int4 / float32: a LoRA Gemma's frozen base (width 256) as placed, where KerasHub is
  installed.
"""

from __future__ import annotations

import optax

from benchmarks.common import SteadyClock, print_table, summarise
from kithara_ops import Trainer, data
from kithara_ops.config import RunConfig
from kithara_ops.models.remat import remat_scope, rematerialize
from kithara_ops.plan import plan_run


def planned_state(config: RunConfig) -> int:
    """The plan's bytes of everything but the temporaries: state and batch."""
    plan = plan_run(config)
    return plan.trainable + plan.frozen + plan.optimizer_state + plan.batch


def remat_step_seconds(mode: str, steps: int, batch: int, seq_len: int) -> float:
    """Steady seconds per step of the built-in model built under ``remat_scope(mode)``."""
    from kithara_ops import models
    from kithara_ops._backend import seed_keras

    seed_keras(0)
    with remat_scope(mode):
        model = rematerialize(models.causal_lm("tiny", seq_len=seq_len))
    clock = SteadyClock()
    batches = data.load("synthetic", seq_len=seq_len, batch_size=batch, seed=0)
    Trainer(model, optax.adamw(1e-3), batches, steps=steps, log_every=steps, callbacks=[clock],
            tracking=False).train()  # fmt: skip
    return clock.step_seconds


def quantized_frozen_bytes() -> dict[str, list[float]] | None:
    """A LoRA Gemma's frozen bytes (width 256, 2 layers) per quantization; ``None`` without
    KerasHub."""
    try:
        import keras_hub
    except ImportError:
        return None
    import tempfile

    from kithara_ops._backend import seed_keras
    from kithara_ops.models.hub import from_preset
    from kithara_ops.plan import abstract_state, per_device
    from kithara_ops.program import Program

    seed_keras(0)
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=320, num_layers=2, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=256, intermediate_dim=1024, head_dim=64,
    )  # fmt: skip
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None).save_to_preset(folder)
        for mode in ("none", "int8", "int4"):
            config = RunConfig(model=folder, lora_rank=4, quantize=mode, min_shard_size=512)
            model = from_preset(folder, lora_rank=4, quantize=mode, seed=0, min_shard_size=512)
            program = Program(model, optax.adamw(1e-3), config)
            out[mode] = [float(per_device(abstract_state(program).non_trainable))]
    return out


def main(needed: list[float], steps: int, batch: int, seq_len: int) -> dict:
    """Print the fitting tables; ``needed``: the placed bytes of ``memory``'s Optax runs."""
    config = RunConfig(model="tiny", batch_size=batch, seq_len=seq_len)
    plan = summarise(
        {"placed (params + opt + batch)": needed,
         "memory plan (same)": [float(planned_state(config))] * len(needed)},
        baseline="placed (params + opt + batch)",
    )  # fmt: skip
    print_table(f"Memory plan against a run, tiny, batch {batch} x seq {seq_len}", plan, "MB", 1e-6)
    temps = {mode: plan_run(config.replace(remat=mode, seq_len=4 * seq_len)).temp
             for mode in ("none", "full")}  # fmt: skip
    remat = summarise(
        {"temporaries, remat none": [float(temps["none"])],
         "temporaries, remat full": [float(temps["full"])]},
        baseline="temporaries, remat none",
    )  # fmt: skip
    print_table(f"Plan temporaries, tiny, batch {batch} x seq {4 * seq_len}", remat, "MB", 1e-6)
    seconds = {
        mode: [remat_step_seconds(mode, steps, batch, 4 * seq_len)] for mode in ("none", "full")
    }
    time = summarise({f"step, remat {m}": v for m, v in seconds.items()}, "step, remat none")
    print_table(f"Step time, tiny, batch {batch} x seq {4 * seq_len}", time, "ms", 1e3)
    precision = summarise(
        {"state, float32": [float(planned_state(config))],
         "state, bfloat16": [float(planned_state(config.replace(precision="bfloat16")))]},
        baseline="state, float32",
    )  # fmt: skip
    print_table("Planned state and batch bytes, tiny", precision, "MB", 1e-6)
    result = {"plan": plan, "remat_temp": remat, "remat_time": time, "precision": precision}
    frozen = quantized_frozen_bytes()
    if frozen is not None:
        qlora = summarise({f"frozen base, {m}": v for m, v in frozen.items()}, "frozen base, none")
        print_table("LoRA Gemma (width 256) frozen base bytes", qlora, "MB", 1e-6)
        result["qlora_frozen"] = qlora
    return result
