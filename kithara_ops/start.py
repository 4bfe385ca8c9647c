"""Where a run starts, decided before any loop exists.

Two decisions: the ``RunConfig`` of a run whose model, data and optimizer a Python caller
handed over as objects (``final_config``), and the state the loop starts from
(``decide_start``): a fresh state, or a checkpoint restored into the program's template,
with the run's identity, data position and last values. The directory policy (a fresh run
refused over another run's checkpoints, ``overwrite``) is applied here, so the loop never
restores or deletes anything.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Mapping
from typing import Any

import keras
import numpy as np

from kithara_ops import feed
from kithara_ops.callbacks import RunInfo
from kithara_ops.checkpoint.record import RunRecord, new_run_uid
from kithara_ops.checkpoint.restore import Restored, resume_point
from kithara_ops.config import RunConfig, field_types
from kithara_ops.errors import ConfigError
from kithara_ops.models.adapter import resolve_precision
from kithara_ops.models.hub import base_model_of
from kithara_ops.state import SEED_STATE, TrainState
from kithara_ops.stopping import Bests, describe_stop, stop_reason


def final_config(
    model: keras.Model,
    optimizer_label: str,
    train_data: Iterable[Mapping],
    config: RunConfig | None,
    options: dict[str, Any],
) -> tuple[RunConfig, frozenset[str], Iterable[Mapping]]:
    """The config of a run, final before the run, the fields given as objects, and the data.

    Without a ``config`` (a Python caller's objects) the objects are named by their labels
    (the returned ``given`` lists them): a preset model by its handle, as the CLI names it, so
    that a resume or an export from the command line loads the same base. When the data was
    given as an object, the config records the batch shape the data really has (its first
    batch is peeked at; the returned data still yields it). The precision is resolved
    against the model's dtype policy.
    """
    if config is None:
        base = base_model_of(model) or {}
        labels = {
            "model": base.get("handle", model.name),
            "data": type(train_data).__name__,
            "optimizer": optimizer_label,
        }
        if base.get("lora_rank"):
            lora = {key: base[key] for key in ("lora_rank", "lora_targets", "lora_alpha")}
            lora["quantize"] = base.get("quantize") or "none"
            options = {**lora, **options}
        resolved, given = RunConfig.from_dict({**labels, **options}), frozenset(labels)
    else:
        resolved = config.replace(**options) if options else config
        given = frozenset()
    if "data" in given:
        first, train_data = feed.peek(train_data)
        if isinstance(first, Mapping) and "x" in first:
            rows, length = np.shape(first["x"])[:2]
            resolved = resolved.replace(batch_size=int(rows), seq_len=int(length))
    precision = resolve_precision(
        model, resolved.precision, config is not None or "precision" in options,
        typing.get_args(field_types()["precision"]),
    )  # fmt: skip
    return resolved.replace(precision=precision), given, train_data


@dataclasses.dataclass(frozen=True)
class Start:
    """The state a run starts from, and what it carries over from a checkpoint.

    Attributes:
      state: the train state on the devices (fresh or restored).
      run_uid: the run's identity (a restored run keeps its own).
      data_position: the data iterator's saved position, or ``None`` (from the beginning,
        fast-forwarded by the step count).
      restored: the checkpoint restored, or ``None`` for a fresh start.
    """

    state: TrainState
    run_uid: str
    data_position: Any = None
    restored: Restored | None = None

    @property
    def step(self) -> int:
        """The step the run continues from."""
        return int(self.state.step)

    def check_before(self, total: int, config: RunConfig | None = None) -> int:
        """``total``, once it is sure the run has steps left to take: it is short of
        ``total``, and if it stopped early, ``config``'s stopping rule no longer holds."""
        if self.step >= total:
            raise ConfigError(
                f"The run is already at step {self.step} and steps is {total}: steps counts "
                f"the run's total, so ask for more than {self.step}."
            )
        record = self.record
        if config is not None and record is not None and record.stop_reason:
            bests = Bests.from_json(record.bests, config.target_eval_loss)
            patience, target = config.early_stop_patience, config.target_eval_loss
            if stop_reason(bests, patience, target):
                why = describe_stop(
                    record.stop_reason, bests, patience, config.early_stop_min_delta
                )
                raise ConfigError(
                    f"The run stopped early at step {self.step}: {why}. To train on, resume "
                    "with a larger --early-stop-patience or a lower --target-eval-loss."
                )
        return total

    @property
    def record(self) -> RunRecord | None:
        """The restored checkpoint's record, or ``None``."""
        return self.restored.record if self.restored else None


def decide_start(
    program: Any,
    store: Any,
    resume: bool | int = False,
    reset_optimizer: bool = False,
    overwrite: bool = False,
) -> Start:
    """A fresh start from ``program``, or a restore from ``store`` into its template.

    Args:
      program: the run's ``Program`` (``fresh_state()``, ``template()``).
      store: the run's ``Checkpointer``, or ``None`` without a checkpoint directory.
      resume: ``True`` continues from the newest readable checkpoint (or starts fresh when
        there is none yet); a step number from that checkpoint; ``False`` starts fresh.
      reset_optimizer: with ``resume``, keep weights, step and data position but start a
        fresh optimizer state.
      overwrite: without ``resume``, delete the checkpoints the directory already holds (a
        fresh run into a directory with checkpoints is refused otherwise).
    """
    restored = resume_point(store, program.template, resume, reset_optimizer, overwrite)
    if restored is None:
        return Start(program.fresh_state(), new_run_uid())
    return Start(restored.state, restored.record.run_uid, restored.record.data_position, restored)


def run_info(program: Any, begin: Start, total: int, progress: Any, train_data: Any) -> RunInfo:
    """What the sinks hear at the start of a run of ``program`` from ``begin`` to ``total``
    (``progress``: the loop's ``timing.Progress``)."""
    model, restored = program.model, begin.restored
    return RunInfo(
        config=program.config,
        model=model,
        optimizer=program.adapter.optimizer,
        description=program.description,
        num_params=_count(v for v in model.variables if not v.path.endswith(SEED_STATE)),
        num_trainable_params=_count(model.trainable_variables),
        mesh_shape=dict(program.mesh.shape),
        start_step=begin.step,
        total_steps=total,
        run_uid=begin.run_uid,
        key_groups=program.key_groups,
        resumed_from=begin.record,
        optimizer_change=restored.optimizer_change if restored else None,
        data=train_data.summary() if hasattr(train_data, "summary") else None,
        base_model=program.base_model,
        state_bytes=progress.placed,
        given=program.given,
        state_dtypes={
            "params": floating_dtypes(begin.state.params),
            "optimizer_state": floating_dtypes(begin.state.opt_state),
        },
        lower_train_step=lambda: progress.lower_step(),
    )


def _count(variables) -> int:
    """Number of elements in ``variables``."""
    return int(sum(np.prod(v.shape, dtype=np.int64) for v in variables))


def floating_dtypes(tree: Any) -> str:
    """The floating dtypes of ``tree``'s arrays, comma-separated (``-`` for none)."""
    import jax
    import jax.numpy as jnp

    # jnp's test: NumPy does not count bfloat16 (an ml_dtypes type) as floating.
    found = {str(leaf.dtype) for leaf in jax.tree.leaves(tree)
             if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)}  # fmt: skip
    return ",".join(sorted(found)) or "-"
