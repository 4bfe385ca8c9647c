"""``RunConfig``: the one description of a training run.

The CLI fills it from options, a YAML/TOML file loads into it, the tracker flattens it into
MLflow params and the checkpoint stores it, so that a run can always be rebuilt from it.
Every field validates itself in ``__post_init__`` and a bad value raises ``ConfigError``
naming the field, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from kithara_ops.config.checks import check_loop, check_lora, check_positive, check_run
from kithara_ops.config.credentials import take_credentials
from kithara_ops.config.fields import (
    CKPT,
    DIST,
    LOOP,
    MODEL,
    OPTIM,
    SHARD,
    TRACK,
    attributes_doc,
    option,
    parse_mesh_shape,
)
from kithara_ops.config.files import read_values
from kithara_ops.errors import ConfigError

LAUNCH_FIELDS = ("coordinator", "num_processes", "process_id")
"""The fields that connect the processes of a multi-process run (see ``distributed``)."""

OBJECT_FIELDS = ("model", "data", "optimizer")
"""The fields a Python caller may give as live objects instead of specs: the config then holds
the object's label (``causal_lm``, ``Dataset``, ``optax:adamw lr=0.001``), which ``build``
cannot rebuild from; the program and the checkpoint's record list such fields as ``given``."""

DEFAULT_STEPS = 200
"""Steps of a run that sets neither ``steps`` nor ``epochs``: a short, visible run."""


@dataclasses.dataclass
class RunConfig:
    """Everything that defines a run, as plain values (no live objects).

    Each field's help text lives in its ``option(...)`` declaration; the ``Attributes``
    section below is generated from them, as are ``kithara-ops train``'s options.
    """

    model: str = option(
        "tiny",
        "Built-in size (tiny, small), a module:function returning a keras.Model, a KerasHub "
        "preset or Hugging Face folder, or a KerasHub handle (kaggle://, hf://, a preset name).",
        MODEL,
    )
    data: str = option(
        "stdlib",
        "Training data: stdlib, synthetic, a text file/dir/glob, or a .jsonl file.",
        MODEL,
    )
    eval_data: str | None = option(
        None, "Evaluation data, in the same forms as data; None: no evaluation.", MODEL
    )
    tokenizer: str = option(
        "auto",
        "How text becomes ids: auto (a preset model's own tokenizer, else bytes), byte, or a "
        "KerasHub or Hugging Face preset folder (or hub handle) whose tokenizer to use.",
        MODEL,
    )
    chat_template: str | None = option(
        None,
        "A Jinja chat template file (or a tokenizer_config.json) for the messages rows of chat "
        "data; None: the model folder's own (Hugging Face folders ship one, KerasHub presets "
        "do not).",
        MODEL,
    )
    optimizer: str = option(
        "optax.adamw",
        "Optimizer spec: a name such as optax.adamw or keras.AdamW, or a call such as "
        "'optax.adamw(1e-3)'.",
        OPTIM,
    )
    learning_rate: float = option(1e-3, "Learning rate used when optimizer is a bare name.", OPTIM)
    weight_decay: float | None = option(
        None,
        "Weight decay used when optimizer is a bare name; None: the optimizer's default.",
        OPTIM,
    )
    steps: int | None = option(
        None,
        f"Total optimizer steps of the run; None: epochs passes over the data if epochs is "
        f"set, else {DEFAULT_STEPS}.",
        LOOP,
        default_text=f"{DEFAULT_STEPS} unless --epochs",
    )
    epochs: int | None = option(
        None, "Passes over the training data, used when steps is None.", LOOP
    )
    batch_size: int = option(
        8, "Global batch size in sequences, across all devices and processes.", LOOP
    )
    seq_len: int = option(128, "Tokens per sequence.", MODEL)
    packing: Literal["concat", "documents", "none"] = option(
        "concat",
        "How documents share rows: concat (they attend to earlier ones in the row), documents "
        "(packed, each attending to itself only: the built-in model), none (one per row).",
        MODEL,
    )
    sharding: Literal["dp", "fsdp"] = option(
        "dp",
        "dp: replicated parameters, sharded batch; fsdp: parameters and optimizer state "
        "sharded too.",
        SHARD,
    )
    mesh_shape: tuple[int, int] | None = option(
        None,
        "(data, fsdp) device mesh, written 2,4 or 2x4 on the command line; None: every "
        "device on the axis sharding names.",
        SHARD,
        parser=parse_mesh_shape,
        metavar="DATA,FSDP",
    )
    device_memory: str | None = option(
        None,
        "One device's memory for the memory plan, e.g. 80GiB; None: what the devices report "
        "(GPU, TPU; the CPU reports none, so runs there are not planned).",
        SHARD,
    )
    min_shard_size: int = option(
        4096,
        "Parameters with fewer elements stay replicated under fsdp (not worth a collective).",
        SHARD,
    )
    seed: int = option(0, "Seeds parameter init, data order and the train step's RNG.", LOOP)
    log_every: int = option(
        10, "Fetch metrics from the devices and report them every this many steps.", LOOP
    )
    eval_every: int | None = option(
        None, "Evaluate every this many steps (and at the end); None: only at the end.", LOOP
    )
    eval_steps: int | None = option(
        None, "Batches per evaluation; None: one full pass over eval_data.", LOOP
    )
    early_stop_patience: int | None = option(
        None,
        "Stop when eval_loss has not improved by more than early_stop_min_delta for this many "
        "evaluations in a row (the run ends FINISHED, checkpointed); None: never.",
        LOOP,
    )
    early_stop_min_delta: float = option(
        0.0, "The least decrease of eval_loss that counts as an improvement.", LOOP
    )
    target_eval_loss: float | None = option(
        None,
        "Stop at the first evaluation whose eval_loss is at or below this value (logged as "
        "steps_to_target); None: no target.",
        LOOP,
    )
    grad_accum_steps: int = option(
        1, "Split each batch into this many micro-batches and sum their gradients.", LOOP
    )
    on_nonfinite: Literal["stop", "skip"] = option(
        "stop",
        "A non-finite loss or gradient: stop the run at the next logging step (exit 1; that "
        "state is not saved), or skip the step (nothing changes) until nonfinite_patience "
        "steps in a row.",
        LOOP,
    )
    nonfinite_patience: int = option(
        10, "With on_nonfinite=skip: how many non-finite steps in a row stop the run.", LOOP
    )
    profile_steps: str | None = option(
        None, "START:END: trace steps START to END (from 1) with the JAX profiler.", LOOP
    )
    step_timeout: float | None = option(
        None,
        "Seconds without a finished step (after the first) before the run is ended as hung, "
        "with exit code 75; None: wait forever.",
        LOOP,
    )
    eval_prompts: str | None = option(
        None, "JSONL of prompts completed greedily during training, logged as a table.", LOOP
    )
    generate_every: int | None = option(
        None, "Complete the eval prompts every N steps (and at the last); None: at the last.", LOOP
    )
    max_new_tokens: int = option(32, "The most tokens a sample's completion has.", LOOP)
    lora_rank: int | None = option(
        None,
        "LoRA rank for a KerasHub model: only the low-rank adapters train, the base stays "
        "frozen; None: every weight trains.",
        MODEL,
    )
    lora_targets: str | None = option(
        None,
        "Comma-separated names of the layers LoRA adapts, or all-linear (every dense "
        "projection); None: KerasHub's defaults (the attention query and value projections).",
        MODEL,
    )
    quantize: Literal["none", "int8", "int4"] = option(
        "none", "QLoRA: quantize the frozen base (int8, int4) before LoRA; needs lora_rank.", MODEL
    )
    lora_alpha: float | None = option(
        None,
        "LoRA's alpha: the adapters' product is scaled by alpha / rank; None: the rank.",
        MODEL,
    )
    remat: str = option(
        "none",
        "Rematerialisation (Keras RematScope): none, full (recompute every layer in the "
        "backward pass), activations, or larger_than:N (layers whose output exceeds N values).",
        MODEL,
    )
    precision: Literal["float32", "mixed_bfloat16", "bfloat16"] = option(
        "float32",
        "float32; mixed_bfloat16: compute in bfloat16, float32 weights; bfloat16: weights, "
        "compute and the optimizer state in bfloat16 (half the memory, less exact updates).",
        LOOP,
    )
    checkpoint_dir: str | None = option(
        None,
        "Directory for Orbax checkpoints (with the optimizer state); None: no checkpoints.",
        CKPT,
    )
    save_every: int | None = option(
        None,
        "Save a checkpoint every this many steps (and always at the end); None: only at the end.",
        CKPT,
    )
    save_every_minutes: float | None = option(
        None,
        "Save a checkpoint when this many minutes have passed since the last save, alongside "
        "save_every; None: no time-based saves.",
        CKPT,
    )
    keep: int = option(3, "How many checkpoints to keep.", CKPT)
    keep_best: bool = option(
        False,
        "Keep the checkpoints with the lowest eval_loss rather than the newest ones.",
        CKPT,
        flags="--keep-best/--keep-newest",
    )
    tracking: bool = option(True, "Log the run to MLflow.", TRACK)
    tracking_uri: str | None = option(
        None,
        "MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else MLflow's default, "
        "sqlite:///mlflow.db in the current directory.",
        TRACK,
    )
    experiment: str | None = option(
        None, "MLflow experiment; None: $MLFLOW_EXPERIMENT_NAME, else kithara-ops.", TRACK
    )
    parent_run_id: str | None = option(
        None,
        "MLflow run id to log this run under, as a child run (nested in the MLflow UI, "
        "listed by compare --parent); None: a top-level run. kithara-ops sweep sets it.",
        TRACK,
    )
    group: str | None = option(
        None,
        "What this run is one repetition of, e.g. an optimizer tried over several seeds: "
        "compare --group and the MLflow UI gather runs by it; None: the optimizer's label.",
        TRACK,
    )
    run_name: str | None = option(
        None,
        "MLflow run name; None: the optimizer's short label (e.g. optax:clip+adamw lr=1e-3).",
        TRACK,
    )
    system_metrics: bool = option(
        True, "Log MLflow system metrics (CPU, memory) alongside training metrics.", TRACK
    )
    log_model: bool = option(
        False, "Log the trained model with MLflow's Keras flavour at the end of the run.", TRACK
    )
    coordinator: str | None = option(
        None,
        "Multi-process runs: process 0's HOST:PORT (with num_processes and process_id); "
        "None: one process (or auto-detected).",
        DIST,
    )
    num_processes: int | None = option(
        None, "Multi-process runs: how many processes take part (with coordinator).", DIST
    )
    process_id: int | None = option(
        None,
        "Multi-process runs: this process's rank, 0 to num_processes - 1 (with coordinator).",
        DIST,
    )

    def __post_init__(self) -> None:
        # A password in the URI would be kept wherever the config goes: MLflow gets it from
        # its credential variables instead (see ``credentials``).
        self.tracking_uri = take_credentials(self.tracking_uri)
        check_positive(self, "batch_size", "seq_len", "log_every", "grad_accum_steps")
        check_positive(self, "steps", "epochs", "eval_every", "eval_steps", optional=True)
        check_positive(self, "save_every", optional=True)
        check_lora(self)
        check_loop(self)
        check_positive(self, "keep")
        check_positive(self, "min_shard_size", minimum=0)
        _check_choice(self, "sharding")
        _check_choice(self, "precision")
        _check_choice(self, "on_nonfinite")
        check_positive(self, "nonfinite_patience")
        check_run(self)

    def total_steps(self, batches_per_epoch: int | None) -> int:
        """The step a run stops at: ``steps``, else ``epochs`` passes, else ``DEFAULT_STEPS``.

        Args:
          batches_per_epoch: batches in one pass over the training data, ``None`` if the
            data has no length (then ``epochs`` cannot be used).
        """
        if self.steps is not None:
            return self.steps
        if self.epochs is None:
            return DEFAULT_STEPS
        if batches_per_epoch is None:
            raise ConfigError(
                "epochs needs training data with a length (batches per pass); this data "
                "has none: pass steps=N (--steps N) instead."
            )
        return self.epochs * batches_per_epoch

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON/YAML-friendly values."""
        out = dataclasses.asdict(self)
        if out["mesh_shape"] is not None:
            out["mesh_shape"] = list(out["mesh_shape"])
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Build from a mapping, refusing unknown keys with a did-you-mean hint."""
        names = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"Unknown config key {key!r}.{hint}")
        return cls(**values)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` applied (validated like a new config)."""
        return RunConfig.from_dict({**self.to_dict(), **changes})

    def without_launch(self) -> RunConfig:
        """A copy without the multi-process fields (``LAUNCH_FIELDS``).

        They say how one launch of the run joined its processes (an address, a rank), not
        what the run is: checkpoints and the logged ``config/run.yaml`` leave them out, so
        a run can be resumed or repeated with any number of processes.
        """
        return self.replace(**dict.fromkeys(LAUNCH_FIELDS))

    def dump_yaml(self) -> str:
        """The config as a YAML document that ``load_config`` reads back."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# The field list of the docstring comes from the fields' own help texts (no second copy).
RunConfig.__doc__ = f"{inspect.cleandoc(RunConfig.__doc__ or '')}\n\n{attributes_doc(RunConfig)}\n"


@functools.cache
def field_types() -> dict[str, Any]:
    """``RunConfig``'s field types, evaluated (the annotations are strings in this module)."""
    return typing.get_type_hints(RunConfig)


def load_config(path: str | Path) -> RunConfig:
    """Read a ``RunConfig`` from a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file.

    The file is read within limits (size, nesting, no YAML aliases; see ``config_file``),
    and its keys must be ``RunConfig`` fields.

    Raises:
      ConfigError: one line naming the file, what is wrong and the fix.
    """
    path = Path(path)
    values = read_values(path)
    if not isinstance(values, dict):
        raise ConfigError(f"Config file {str(path)!r} must hold a mapping of option: value.")
    return RunConfig.from_dict(values)


def _check_choice(cfg: RunConfig, name: str) -> None:
    choices = field_types()[name].__args__  # the field's Literal is the one list of choices
    value = getattr(cfg, name)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")
