"""Checks of single ``RunConfig`` values: each returns the value it accepts or raises a
``ConfigError`` naming the field, the value and what it must be."""

from __future__ import annotations

import math
import re
from typing import Any

from kithara_ops.distributed import check_options
from kithara_ops.errors import ConfigError


def check_positive(cfg: Any, *names: str, optional: bool = False, minimum: int = 1) -> None:
    """Refuse any of ``names`` on ``cfg`` that is not an integer >= ``minimum`` (``None``
    passes when ``optional``)."""
    for name in names:
        value = getattr(cfg, name)
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise ConfigError(f"{name} must be {kind}, got {value!r}.")


def number(cfg: Any, name: str, lower: float, inclusive: bool) -> float:
    """A finite float above ``lower``; numeric strings count (YAML 1.1 reads ``3e-4`` as one)."""
    value = getattr(cfg, name)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}.") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}.")
    if value < lower or (value == lower and not inclusive):
        bound = ">=" if inclusive else ">"
        raise ConfigError(f"{name} must be {bound} {lower:g}, got {value!r}.")
    return float(value)


BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
"""Suffixes ``parse_bytes`` reads, case-insensitively."""


def parse_bytes(text: str) -> int:
    """``"80GiB"``, ``"16 GB"`` or ``"1e9"`` as a number of bytes.

    Raises:
      ConfigError: not a positive size.
    """
    cleaned = str(text).strip().lower().replace(" ", "")
    digits = cleaned.rstrip("abcdefghijklmnopqrstuvwxyz")
    try:
        value = float(digits) * BYTE_UNITS[cleaned[len(digits) :]]
    except (KeyError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value < 1:
        raise ConfigError(
            f"device_memory {text!r} is not a size: pass e.g. 80GiB, 16GB or 17179869184."
        )
    return int(value)


def check_run(cfg: Any) -> None:
    """What the run is: its named parts, learning rate, mesh, parent run and processes."""
    if cfg.optimizer == "":
        raise ConfigError("Optimizer spec is empty: pass e.g. 'optax.adamw(1e-3)'.")
    for name in ("model", "data", "optimizer", "tokenizer"):
        if not isinstance(getattr(cfg, name), str) or not getattr(cfg, name):
            raise ConfigError(f"{name} must be a non-empty string, got {getattr(cfg, name)!r}.")
    cfg.learning_rate = number(cfg, "learning_rate", lower=0.0, inclusive=False)
    if cfg.weight_decay is not None:
        cfg.weight_decay = number(cfg, "weight_decay", lower=0.0, inclusive=True)
    cfg.mesh_shape = mesh_shape(cfg.mesh_shape)
    if cfg.parent_run_id is not None and not re.fullmatch(r"[0-9a-f]{32}", cfg.parent_run_id):
        raise ConfigError(
            f"parent_run_id {cfg.parent_run_id!r} is not an MLflow run id (32 hex "
            "digits): pass the id of a run of the experiment (the UI's Run ID)."
        )
    check_options(cfg.coordinator, cfg.num_processes, cfg.process_id)
    if cfg.device_memory is not None:
        parse_bytes(cfg.device_memory)
    if cfg.batch_size % cfg.grad_accum_steps:
        raise ConfigError(
            f"batch_size {cfg.batch_size} is not divisible by grad_accum_steps "
            f"{cfg.grad_accum_steps}: choose a batch size that is a multiple of it."
        )


def check_loop(cfg: Any) -> None:
    """The loop's numbers: timeouts, windows, stopping and samples."""
    if cfg.save_every_minutes is not None:
        cfg.save_every_minutes = number(cfg, "save_every_minutes", 0.0, inclusive=False)
    cfg.profile_steps = step_window(cfg, "profile_steps")
    if cfg.step_timeout is not None:
        cfg.step_timeout = number(cfg, "step_timeout", 0.0, inclusive=False)
    check_positive(cfg, "early_stop_patience", "generate_every", optional=True)
    cfg.early_stop_min_delta = number(cfg, "early_stop_min_delta", 0.0, inclusive=True)
    if cfg.target_eval_loss is not None:
        cfg.target_eval_loss = number(cfg, "target_eval_loss", -math.inf, inclusive=True)
    check_positive(cfg, "max_new_tokens")
    remat_mode(cfg.remat)
    if cfg.generate_every is not None and cfg.eval_prompts is None:
        raise ConfigError(
            f"generate_every {cfg.generate_every!r} is set but eval_prompts is not: pass "
            "--eval-prompts FILE too, or drop --generate-every."
        )


def remat_mode(spec: str) -> tuple[str, int]:
    """``--remat``'s mode and output threshold (``larger_than:N``; Keras' 1024 otherwise).

    Raises:
      ConfigError: not one of the modes.
    """
    mode, _, threshold = str(spec).partition(":")
    if mode in ("none", "full", "activations") and not threshold:
        return mode, 1024
    if mode == "larger_than" and threshold.isdigit() and int(threshold) > 0:
        return mode, int(threshold)
    raise ConfigError(
        f"remat {spec!r} is not a mode: use none, full, activations or larger_than:N "
        "(N a positive number of values)."
    )


def check_lora(cfg: Any) -> None:
    """LoRA's options: a positive rank, and targets or alpha only with a rank."""
    check_positive(cfg, "lora_rank", optional=True)
    for name in ("lora_targets", "lora_alpha"):
        if getattr(cfg, name) is not None and cfg.lora_rank is None:
            raise ConfigError(
                f"{name} {getattr(cfg, name)!r} is set but lora_rank is not: pass "
                f"--lora-rank R too, or drop --{name.replace('_', '-')}."
            )
    if cfg.quantize != "none" and cfg.lora_rank is None:
        raise ConfigError(
            f"quantize {cfg.quantize!r} freezes a quantized base, which trains only through "
            "adapters: pass --lora-rank R too (QLoRA), or drop --quantize."
        )
    if cfg.lora_alpha is not None:
        cfg.lora_alpha = number(cfg, "lora_alpha", 0.0, inclusive=False)


def mesh_shape(value: Any) -> tuple[int, int] | None:
    """``value`` as a ``(data, fsdp)`` pair of positive integers, or ``None``."""
    if value is None:
        return None
    ok = isinstance(value, list | tuple) and len(value) == 2
    ok = ok and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in value)
    if not ok:
        raise ConfigError(f"mesh_shape must be two positive integers (data, fsdp), got {value!r}.")
    return (value[0], value[1])


def step_window(cfg: Any, name: str) -> str | None:
    """``START:END`` with whole numbers ``1 <= START <= END``, written back normalised."""
    value = getattr(cfg, name)
    if value is None:
        return None
    start, _, end = str(value).partition(":")
    try:
        first, last = int(start), int(end)
    except ValueError:
        first = last = 0
    if not 1 <= first <= last:
        raise ConfigError(
            f"{name} must be START:END with 1 <= START <= END, e.g. 5:8; got {value!r}."
        )
    return f"{first}:{last}"


def window(text: str) -> tuple[int, int]:
    """The ``(start, end)`` of a ``step_window`` value."""
    start, end = text.split(":")
    return int(start), int(end)
