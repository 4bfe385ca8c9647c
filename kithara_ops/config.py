"""``RunConfig``: the one description of a training run.

The CLI fills it from options, a YAML/TOML file loads into it, the tracker flattens it into
MLflow params and the checkpoint stores it, so that a run can always be rebuilt from it.
Every field validates itself in ``__post_init__`` and a bad value raises ``ConfigError``
naming the field, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml

from kithara_ops.distributed import check_options
from kithara_ops.errors import ConfigError

Sharding = Literal["dp", "fsdp"]
Precision = Literal["float32", "mixed_bfloat16"]

LAUNCH_FIELDS = ("coordinator", "num_processes", "process_id")
"""The fields that connect the processes of a multi-process run (see ``distributed``)."""

OBJECT_FIELDS = ("model", "data", "optimizer")
"""The fields a Python caller may give as live objects instead of specs (see ``given``)."""

DEFAULT_STEPS = 200
"""Steps of a run that sets neither ``steps`` nor ``epochs``: a short, visible run."""


@dataclasses.dataclass
class RunConfig:
    """Everything that defines a run, as plain values (no live objects)."""

    model: str = "tiny"
    """Built-in size (``tiny``, ``small``) or a ``module:function`` returning a ``keras.Model``."""
    data: str = "stdlib"
    """Training data source: ``stdlib``, ``synthetic``, a text file/dir/glob, or a ``.jsonl`` file."""
    eval_data: str | None = None
    """Evaluation data source (same forms as ``data``); ``None`` for no evaluation."""
    optimizer: str = "optax.adamw"
    """Optimizer spec: a name such as ``optax.adamw`` / ``keras.AdamW``, or a call expression."""
    learning_rate: float = 1e-3
    """Learning rate used when ``optimizer`` is a bare name."""
    weight_decay: float | None = None
    """Weight decay used when ``optimizer`` is a bare name (``None``: the optimizer's default)."""
    steps: int | None = None
    """Total optimizer steps of the run; ``None``: ``epochs`` passes, else ``DEFAULT_STEPS`` (200)."""
    epochs: int | None = None
    """Passes over the training data, used when ``steps`` is ``None``."""
    batch_size: int = 8
    """Global batch size in sequences (across all devices and processes)."""
    seq_len: int = 128
    """Tokens per sequence."""
    sharding: Sharding = "dp"
    """``dp``: replicated parameters, sharded batch. ``fsdp``: parameters and optimizer state sharded too."""
    mesh_shape: tuple[int, int] | None = None
    """``(data, fsdp)`` device mesh; ``None`` puts every device on the axis ``sharding`` names."""
    min_shard_size: int = 4096
    """Parameters with fewer elements stay replicated under ``fsdp`` (not worth a collective)."""
    seed: int = 0
    """Seeds parameter init, data order and the train step's RNG."""
    log_every: int = 10
    """Fetch metrics from the devices and report them every this many steps."""
    eval_every: int | None = None
    """Evaluate every this many steps (and at the end); ``None``: only at the end."""
    eval_steps: int | None = None
    """Batches per evaluation; ``None``: one full pass over ``eval_data``."""
    grad_accum_steps: int = 1
    """Split each batch into this many micro-batches and sum their gradients."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient: ``stop`` the run at the next logging step (exit 1, the
    state is not saved), or ``skip`` the step (nothing changes) until ``nonfinite_patience``
    steps in a row."""
    nonfinite_patience: int = 10
    """With ``on_nonfinite=skip``: how many non-finite steps in a row stop the run."""
    precision: Precision = "float32"
    """``mixed_bfloat16`` computes the built-in model in bfloat16 with float32 master weights."""
    checkpoint_dir: str | None = None
    """Directory for Orbax checkpoints; ``None``: no checkpoints."""
    save_every: int | None = None
    """Save a checkpoint every this many steps (and always at the end)."""
    keep: int = 3
    """How many checkpoints to keep."""
    keep_best: bool = False
    """Keep the ``keep`` checkpoints with the lowest ``eval_loss`` rather than the newest."""
    tracking: bool = True
    """Log the run to MLflow."""
    tracking_uri: str | None = None
    """MLflow tracking URI; ``None``: ``MLFLOW_TRACKING_URI``, else MLflow's local sqlite store."""
    experiment: str | None = None
    """MLflow experiment; ``None``: ``MLFLOW_EXPERIMENT_NAME``, else ``kithara-ops``."""
    parent_run_id: str | None = None
    """MLflow run to log this run under, as a child (``kithara-ops sweep`` sets it)."""
    run_name: str | None = None
    """MLflow run name; ``None``: the optimizer's short label (e.g. ``optax:clip+adamw lr=1e-3``)."""
    system_metrics: bool = True
    """Log MLflow system metrics (CPU, memory) alongside training metrics."""
    log_model: bool = False
    """Log the trained model with MLflow's Keras flavour at the end of the run."""
    coordinator: str | None = None
    """Multi-process runs: process 0's ``HOST:PORT``; ``None``: one process (or auto-detected)."""
    num_processes: int | None = None
    """Multi-process runs: how many processes take part (with ``coordinator``)."""
    process_id: int | None = None
    """Multi-process runs: this process's rank, from 0 (with ``coordinator``)."""
    given: frozenset[str] = frozenset()
    """Which of ``model``, ``data``, ``optimizer`` were given as Python objects: their field
    then holds a label (``causal_lm``, ``Dataset``, ``optax:adamw lr=0.001``), not a spec that
    ``build`` could rebuild from."""

    def __post_init__(self) -> None:
        _check_positive(self, "batch_size", "seq_len", "log_every", "grad_accum_steps")
        _check_positive(self, "steps", "epochs", "eval_every", "eval_steps", optional=True)
        _check_positive(self, "save_every", optional=True)
        _check_positive(self, "keep")
        _check_positive(self, "min_shard_size", minimum=0)
        _check_choice(self, "sharding", ("dp", "fsdp"))
        _check_choice(self, "precision", ("float32", "mixed_bfloat16"))
        _check_choice(self, "on_nonfinite", ("stop", "skip"))
        _check_positive(self, "nonfinite_patience")
        if self.optimizer == "":
            raise ConfigError("Optimizer spec is empty: pass e.g. 'optax.adamw(1e-3)'.")
        for name in ("model", "data", "optimizer"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(
                    f"{name} must be a non-empty string, got {getattr(self, name)!r}."
                )
        self.learning_rate = _number(self, "learning_rate", lower=0.0, inclusive=False)
        if self.weight_decay is not None:
            self.weight_decay = _number(self, "weight_decay", lower=0.0, inclusive=True)
        self.mesh_shape = _mesh_shape(self.mesh_shape)
        self.given = frozenset(self.given)
        if not self.given <= set(OBJECT_FIELDS):
            raise ConfigError(
                f"given may name only {', '.join(OBJECT_FIELDS)}; got {sorted(self.given)}."
            )
        check_options(self.coordinator, self.num_processes, self.process_id)
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(
                f"batch_size {self.batch_size} is not divisible by grad_accum_steps "
                f"{self.grad_accum_steps}: choose a batch size that is a multiple of it."
            )

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

    def is_spec(self, name: str) -> bool:
        """Whether field ``name`` holds a spec ``build`` can rebuild (not an object's label)."""
        return name not in self.given

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON/YAML-friendly values."""
        out = dataclasses.asdict(self)
        if out["mesh_shape"] is not None:
            out["mesh_shape"] = list(out["mesh_shape"])
        out["given"] = sorted(self.given)
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


def load_config(path: str | Path) -> RunConfig:
    """Read a ``RunConfig`` from a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"Config file {str(path)!r} does not exist: check the path.")
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} is not a file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"Config file {str(path)!r} is not UTF-8 text.") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            values = tomllib.loads(text)
        elif suffix == ".json":
            values = json.loads(text)
        else:
            values = yaml.safe_load(text) or {}
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        first = str(err).splitlines()[0]
        raise ConfigError(f"Config file {str(path)!r} is not valid: {first}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"Config file {str(path)!r} must hold a mapping of option: value.")
    return RunConfig.from_dict(values)


def _check_positive(cfg: RunConfig, *names: str, optional: bool = False, minimum: int = 1) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise ConfigError(f"{name} must be {kind}, got {value!r}.")


def _number(cfg: RunConfig, name: str, lower: float, inclusive: bool) -> float:
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


def _mesh_shape(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    ok = isinstance(value, list | tuple) and len(value) == 2
    ok = ok and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in value)
    if not ok:
        raise ConfigError(f"mesh_shape must be two positive integers (data, fsdp), got {value!r}.")
    return (value[0], value[1])


def _check_choice(cfg: RunConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")
