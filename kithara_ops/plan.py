"""A memory plan before the first step: what each device will hold, from the compiled step.

``memory_plan(program)`` lowers and compiles the run's train step on its mesh for the state's
abstract shapes (``jax.ShapeDtypeStruct`` with the state's shardings: nothing is allocated)
and reads XLA's compiled memory analysis. Per device, the most any device holds:

- ``trainable``, ``frozen`` (every non-trainable variable: a LoRA model's base, norm
  statistics), ``optimizer_state``: the state's arrays, from their shard shapes;
- ``batch``: one step's batch;
- ``temp``: activations and temporaries, as XLA's buffer assignment counts them;
- ``output``: what the step returns beyond the state it updates in place (donated);
- ``total``: arguments + outputs - the donated state they share + temporaries.

``abstract_model`` builds a model whose variables have shapes and no values (created inside a
``keras.StatelessScope`` that never initialises them), so a run of a size no machine at hand
could hold is planned from its preset's ``config.json`` alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from kithara_ops.config.checks import parse_bytes
from kithara_ops.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of a run's step (see the module's doc), against the device's memory.

    Attributes:
      devices: devices in the mesh; mesh: its ``{axis: size}``.
      trainable, frozen, optimizer_state, batch, temp, output, total: bytes per device.
      device_memory: the bytes one device has (``memory_stats``'s limit, or as given);
        ``None`` where neither says.
      fits: ``total <= device_memory``; ``None`` without a device memory.
      hints: what to try when the run does not fit.
    """

    devices: int
    mesh: dict[str, int]
    trainable: int
    frozen: int
    optimizer_state: int
    batch: int
    temp: int
    output: int
    total: int
    device_memory: int | None
    fits: bool | None
    hints: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The plan as one JSON-ready document (``train --dry-run --json``)."""
        return {**dataclasses.asdict(self), "hints": list(self.hints)}

    def lines(self) -> list[str]:
        """The plan as the lines ``train --dry-run`` prints."""
        mesh = ", ".join(f"{axis}={size}" for axis, size in self.mesh.items())
        rows = [("trainable", self.trainable), ("frozen", self.frozen),
                ("optimizer state", self.optimizer_state), ("batch", self.batch),
                ("activations and temporaries", self.temp), ("outputs", self.output),
                ("total", self.total)]  # fmt: skip
        out = [f"Memory plan per device ({self.devices} devices, mesh {mesh}):"]
        out += [f"  {name:<29}{human(value):>12}" for name, value in rows]
        if self.device_memory is None:
            out.append("  device memory unknown: pass --device-memory (e.g. 80GiB) to check it")
        else:
            verdict = "fits" if self.fits else "does NOT fit"
            out.append(f"  device memory {human(self.device_memory)}: {verdict}")
        out += [f"  try: {hint}" for hint in self.hints]
        return out


def human(n: int) -> str:
    """``n`` bytes in binary units, e.g. ``1.5 GiB``."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def abstract_state(program: Any) -> Any:
    """The run's ``TrainState`` as shapes and shardings, read from the model's variables
    (which may have no values) and the optimizer's ``init`` traced on them."""
    from kithara_ops.state import TrainState

    shardings, model, keys = program.state_shardings, program.model, program.key_groups

    def shapes(variables: Any, names: list[str], placed: dict) -> dict:
        return {key: jax.ShapeDtypeStruct(tuple(v.shape), np.dtype(v.dtype), sharding=placed[key])
                for key, v in zip(names, variables)}  # fmt: skip

    params = shapes(model.trainable_variables, keys["params"], shardings.params)
    opt = jax.eval_shape(program.steps.init_optimizer, params)
    return TrainState(
        step=jax.ShapeDtypeStruct((), np.int32, sharding=shardings.step),
        params=params,
        non_trainable=shapes(
            model.non_trainable_variables, keys["non_trainable"], shardings.non_trainable
        ),
        opt_state=jax.tree.map(
            lambda leaf, placed: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=placed),
            opt,
            shardings.opt_state,
        ),
        rng=jax.ShapeDtypeStruct((2,), np.uint32, sharding=shardings.rng),
    )


def per_device(tree: Any) -> int:
    """Bytes of the largest shard of each leaf, summed: what one device holds of ``tree``."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def plan_run(config: Any) -> MemoryPlan:
    """The memory plan of the run ``config`` describes, built without its weights
    (``abstract_model``) and without reading its data (``train --dry-run``)."""
    from kithara_ops.models.hub import is_preset
    from kithara_ops.models.registry import SIZES
    from kithara_ops.optim.spec import build_optimizer
    from kithara_ops.program import Program

    if config.quantize != "none":
        raise ConfigError(
            f"A quantized base ({config.quantize}) is quantized from its weights, which the "
            "plan does not load: plan the float run (drop --quantize; int8 holds about a "
            "quarter of its frozen bytes, int4 about an eighth plus scales)."
        )
    vocab = 0  # a preset's vocabulary is its config's
    if config.model in SIZES or not is_preset(config.model):
        from kithara_ops.data.preset_tokenizer import run_tokenizer

        vocab = run_tokenizer(config.tokenizer, config.model, config.chat_template).vocab_size
    optimizer = build_optimizer(config.optimizer, config.learning_rate, config.weight_decay)
    program = Program(abstract_model(config, vocab), optimizer, config)
    return memory_plan(program, config.device_memory and parse_bytes(config.device_memory))


def check_fits(program: Any) -> None:
    """Refuse, in one line, a run whose plan exceeds its devices' memory; a run whose
    device memory is unknown (the CPU, without ``device_memory``) is not planned."""
    given = program.config.device_memory
    limit = parse_bytes(given) if given else _device_limit(program.mesh)
    if limit is None:
        return
    plan = memory_plan(program, limit)
    if not plan.fits:
        hint = f" Try {plan.hints[0]}." if plan.hints else ""
        raise ConfigError(
            f"This run needs {human(plan.total)} per device and a device has "
            f"{human(limit)}: it will not fit.{hint} (kithara-ops train --dry-run shows the plan.)"
        )


def memory_plan(program: Any, device_memory: int | None = None) -> MemoryPlan:
    """The memory plan of ``program``'s train step (see the module's doc).

    Args:
      program: the run's ``Program``; its model may be abstract (``abstract_model``).
      device_memory: one device's bytes; ``None``: the backend's ``memory_stats`` limit
        where it reports one.
    """
    state = abstract_state(program)
    config = program.config
    batch = {
        name: jax.ShapeDtypeStruct((config.batch_size, config.seq_len), dtype,
                                   sharding=program.batch_sharding)
        for name, dtype in (("x", np.int32), ("y", np.int32), ("mask", np.float32))
        + ((("segment_ids", np.int32), ("positions", np.int32)) if config.packing != "concat" else ())
    }  # fmt: skip
    compiled = program.steps.train_step.lower(state, batch).compile()
    stats = compiled.memory_analysis()
    argument = int(getattr(stats, "argument_size_in_bytes", 0))
    output = int(getattr(stats, "output_size_in_bytes", 0))
    alias = int(getattr(stats, "alias_size_in_bytes", 0))
    temp = int(getattr(stats, "temp_size_in_bytes", 0))
    total = argument + output - alias + temp
    if device_memory is None:
        device_memory = _device_limit(program.mesh)
    fits = None if device_memory is None else total <= device_memory
    return MemoryPlan(
        devices=int(program.mesh.size),
        mesh={str(k): int(v) for k, v in program.mesh.shape.items()},
        trainable=per_device(state.params),
        frozen=per_device(state.non_trainable),
        optimizer_state=per_device(state.opt_state),
        batch=per_device(batch),
        temp=temp,
        output=max(output - alias, 0),
        total=total,
        device_memory=device_memory,
        fits=fits,
        hints=() if fits is not False else hints(program),
    )


def hints(program: Any) -> tuple[str, ...]:
    """What to try for a run that does not fit, most effective first for this config."""
    config, out = program.config, []
    if config.sharding != "fsdp" and program.mesh.size > 1:
        out.append("--sharding fsdp (the parameters and optimizer state split over devices)")
    if config.lora_rank is None and hasattr(program.model, "backbone"):
        out.append("--lora-rank 8 (only adapters train: no optimizer state for the base)")
    if config.batch_size > 1:
        out.append(
            f"--grad-accum-steps {2 * config.grad_accum_steps} (half the activations per "
            "micro-batch, the same batch)"
        )
        out.append(f"--batch-size {max(config.batch_size // 2, 1)} (half the activations)")
    if config.precision == "float32":
        out.append("--precision mixed_bfloat16 (activations in bfloat16)")
    return tuple(out)


def _device_limit(mesh: Any) -> int | None:
    """The smallest ``bytes_limit`` the mesh's devices report, or ``None`` (the CPU)."""
    limits = []
    for device in mesh.devices.flat:
        try:
            stats = device.memory_stats()
        except Exception:  # a backend without memory statistics
            stats = None
        if not stats or "bytes_limit" not in stats:
            return None
        limits.append(int(stats["bytes_limit"]))
    return min(limits) if limits else None


def abstract_model(config: Any, vocab_size: int) -> Any:
    """The model ``config`` names with variables that have shapes and no values.

    A preset is built from its ``config.json`` alone (its weights are never read): the
    backbone inside a ``keras.StatelessScope`` that leaves variables uninitialised, then its
    causal LM around it; LoRA is enabled as ``build_model`` would.
    """
    import keras

    from kithara_ops.models.hub import enable_lora, is_preset
    from kithara_ops.models.registry import SIZES, resolve_model
    from kithara_ops.models.remat import remat_scope, rematerialize

    if config.model not in SIZES and is_preset(config.model):
        with remat_scope(config.remat):
            model = _abstract_preset(config.model, config.precision)
    else:
        with keras.StatelessScope(initialize_variables=False), remat_scope(config.remat):
            model = resolve_model(
                config.model, vocab_size=vocab_size, seq_len=config.seq_len,
                dtype=config.precision if config.precision != "float32" else None,
            )  # fmt: skip
    if config.lora_rank is not None:
        with keras.StatelessScope(initialize_variables=False):
            enable_lora(model, config.lora_rank, config.lora_targets, config.lora_alpha)
    return rematerialize(model)


def _abstract_preset(handle: str, precision: str) -> Any:
    """A KerasHub causal LM of the preset folder ``handle``'s config, without its weights."""
    from pathlib import Path

    import keras

    from kithara_ops.models.hub import require_keras_hub

    hub = require_keras_hub()
    if not (Path(handle).expanduser() / "config.json").is_file():
        raise ConfigError(
            f"A memory plan reads a preset folder's config.json, and {handle!r} has none: "
            "pass a local KerasHub or Hugging Face folder (config.json is enough, no weights)."
        )
    with keras.StatelessScope(initialize_variables=False):
        backbone = hub.models.Backbone.from_preset(
            str(Path(handle).expanduser()), load_weights=False, dtype=precision
        )
    # The task is made outside the scope: compiling it makes an optimizer variable.
    tasks = list(hub.models.CausalLM.__subclasses__())
    tasks += [sub for task in tasks for sub in task.__subclasses__()]
    for task in tasks:
        if getattr(task, "backbone_cls", None) is type(backbone):
            return task(backbone=backbone, preprocessor=None)
    raise ConfigError(f"KerasHub has no causal LM for {type(backbone).__name__}: it has no plan.")
