"""The Trainer: owns the loop, compiles the step once, and reports to callbacks.

Read ``Trainer.train`` top to bottom: find the starting state, then step, log, evaluate,
report, repeat. Everything else (tracking, checkpoints, progress) is a callback that reads
only the events the loop hands it.
"""

from __future__ import annotations

import functools
import math
import time
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import keras
import numpy as np

from kithara_ops import distributed, feed
from kithara_ops import state as state_lib
from kithara_ops.callbacks import Callback, CallbackList, RunInfo, StepRecord, TrainResult
from kithara_ops.config import RunConfig, field_types
from kithara_ops.cost import StepCost
from kithara_ops.errors import ConfigError, Diverged, StoreFailed
from kithara_ops.guard import NonfiniteGuard
from kithara_ops.interrupt import StopRequests, TrainingStopped
from kithara_ops.models import layout_rules_of
from kithara_ops.models.adapter import adapt_model, check_trainable, resolve_precision
from kithara_ops.models.hub import base_model_of, draw_lora, lora_seeded
from kithara_ops.optim import as_adapter
from kithara_ops.optim.describe import describe_optimizer
from kithara_ops.restore import Restored, StateTemplate, resume_point
from kithara_ops.run_record import new_run_uid
from kithara_ops.sharding import (
    LayoutRule,
    as_layout_rules,
    batch_sharding,
    data_parallel_size,
    make_mesh,
)
from kithara_ops.sinks import Sinks, build_sinks
from kithara_ops.state import TrainState, parked_on_host
from kithara_ops.step import StepBuilder, compile_steps
from kithara_ops.timing import Clock, every


class Trainer:
    """Trains a Keras model on JAX with a Keras or an Optax optimizer, sharded over a mesh.

    Args:
      model: a built ``keras.Model`` mapping token ids ``(batch, seq)`` to logits.
      optimizer: a ``keras.optimizers.Optimizer`` or an ``optax.GradientTransformation``.
      train_data: an iterable of batches (mappings with ``x``, ``y`` and optional ``mask``),
        e.g. ``kithara_ops.data.load(...)``; re-iterated at the end of each pass.
      eval_data: optional re-iterable of eval batches; each evaluation is one pass over it
        (or its first ``eval_steps`` batches), so it must end: load it with
        ``data.load(..., repeat=False, shuffle=False)``. An endless one (a ``Dataset`` that
        repeats) is refused unless ``eval_steps`` bounds it.
      config: a ``RunConfig``; keyword ``options`` override its fields. Without one, the
        config names the objects given (``config.given``) by their labels.
      callbacks: extra ``Callback`` objects, called after the sinks the config asks for.
      sinks: the sinks to report to, from ``kithara_ops.sinks.build_sinks``; by default
        built from the config (MLflow tracker, checkpointer) plus ``callbacks``.
      layout_rules: ``[(regex, spec), ...]`` placing parameters and frozen weights under
        ``fsdp``, or a Keras ``LayoutMap`` (e.g. KerasHub's ``get_layout_map``); defaults to
        ``model.get_layout_rules()`` when the model has it, else a size-based rule.
      devices: devices for the mesh (default: all).
      **options: any ``RunConfig`` field, e.g. ``steps=100, sharding="fsdp", seed=1``.
        ``seed`` also draws the LoRA matrices of a ``models.from_preset`` model loaded
        without a seed of its own.

    Example:
      >>> trainer = Trainer(model, optax.adamw(1e-3), data, steps=100)  # doctest: +SKIP
      >>> result = trainer.train()  # doctest: +SKIP
    """

    def __init__(
        self,
        model: keras.Model,
        optimizer: Any,
        train_data: Iterable[Mapping],
        *,
        eval_data: Iterable[Mapping] | None = None,
        config: RunConfig | None = None,
        callbacks: Sequence[Callback] = (),
        sinks: Sinks | None = None,
        layout_rules: Sequence[LayoutRule] | None = None,
        devices: Sequence | None = None,
        **options: Any,
    ):
        if not isinstance(model, keras.Model):
            raise ConfigError(f"model must be a keras.Model, got {type(model).__name__}.")
        if not model.trainable_variables:
            raise ConfigError(
                f"model {model.name!r} has no variables yet: build it (call it on a batch) first."
            )
        self.model, self.train_data, self.eval_data = model, train_data, eval_data
        self.adapter = as_adapter(optimizer, model.trainable_variables)
        self.description = describe_optimizer(self.adapter.optimizer)
        self.config = self._resolve_config(config, options)
        # Before anything is compiled: a model that cannot give logits fails in one line.
        precision = resolve_precision(
            model, self.config.precision, config is not None or "precision" in options,
            typing.get_args(field_types()["precision"]),
        )  # fmt: skip
        self.config = self.config.replace(precision=precision)
        self.model_adapter = adapt_model(model)
        check_trainable(model, self.model_adapter, self.config.seq_len)
        if eval_data is not None:
            feed.check_eval_source(eval_data, self.config.eval_steps)
        if (base_model_of(model) or {}).get("lora_rank") and not lora_seeded(model):
            # Keras drew LoRA's A matrices from its global state: the run's seed decides.
            draw_lora(model, self.config.seed)
        self.sinks = sinks if sinks is not None else build_sinks(self.config, callbacks)
        self.callbacks = CallbackList(self.sinks.callbacks)
        self.mesh = make_mesh(self.config.sharding, self.config.mesh_shape, devices)
        rules = as_layout_rules(layout_rules) if layout_rules is not None else None
        rules = rules if rules is not None else layout_rules_of(model)
        self.key_groups = state_lib.key_groups(
            model, self.adapter, from_preset=base_model_of(model) is not None
        )
        self.state_shardings = state_lib.state_shardings(
            self.mesh, model, self.adapter, rules, self.config.min_shard_size
        )
        self._compile()

    def _resolve_config(self, config: RunConfig | None, options: dict) -> RunConfig:
        """The run's config, final before the run: objects labelled, the batch shape read."""
        if config is None:
            base = base_model_of(self.model) or {}
            labels = {
                # A preset model is named by its handle, as the CLI names it, so that a
                # resume or an export from the command line loads the same base.
                "model": base.get("handle", self.model.name),
                "data": type(self.train_data).__name__,
                "optimizer": self.description["label"],
            }
            if base.get("lora_rank"):
                options = {"lora_rank": base["lora_rank"], "lora_targets": base["lora_targets"],
                           **options}  # fmt: skip
            config = RunConfig.from_dict({**labels, "given": list(labels), **options})
        elif options:
            config = config.replace(**options)
        if "data" in config.given:  # the config records the batch shape the data really has
            first, self.train_data = feed.peek(self.train_data)
            if isinstance(first, Mapping) and "x" in first:
                rows, length = np.shape(first["x"])[:2]
                config = config.replace(batch_size=int(rows), seq_len=int(length))
        return config

    def _compile(self) -> None:
        """Build the pure steps and wrap them with every sharding explicit."""
        micro = jax.sharding.NamedSharding(
            self.mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp"))
        )
        accum = self.config.grad_accum_steps
        builder = StepBuilder(
            self.model,
            self.adapter,
            self.key_groups["params"],
            self.key_groups["non_trainable"],
            accum,
            micro_batch_sharding=micro if accum > 1 else None,
            skip_nonfinite=self.config.on_nonfinite == "skip",
            model_adapter=self.model_adapter,
            clipping=self.description.get("clipping"),
            frozen_keys=self.key_groups.get("frozen", ()),
        )
        self.batch_sharding = batch_sharding(self.mesh)
        self.steps = compile_steps(builder, self.state_shardings, self.batch_sharding)

    @property
    def param_keys(self) -> list[str]:
        """Keys of ``state.params``, in the order of ``model.trainable_variables``."""
        return self.key_groups["params"]

    def initial_state(self) -> TrainState:
        """A fresh state from the model's current variables, placed on the mesh."""
        return state_lib.initial_state(
            self.model, self.state_shardings, self.steps.init_optimizer, self.config.seed,
            shared=self.key_groups.get("frozen", ()),
        )  # fmt: skip

    def state_template(self) -> StateTemplate:
        """What a restore needs: the state's shapes, dtypes and shardings, keys, optimizer."""
        abstract = state_lib.abstract_state(self.initial_state, self.state_shardings)
        frozen = self.key_groups.get("frozen", [])
        return StateTemplate(
            abstract,
            self.key_groups,
            self.adapter,
            self.steps.init_optimizer,
            base_model_of(self.model),
            lambda: state_lib.placed_variables(
                self.model, frozen, self.state_shardings.non_trainable
            ),
        )

    def total_steps(self) -> int:
        """The step the run stops at (``RunConfig.total_steps`` of this data)."""
        length = len(self.train_data) if hasattr(self.train_data, "__len__") else None
        return self.config.total_steps(length)

    # ------------------------------------------------------------------------------ loop
    def train(
        self, resume: bool | int = False, reset_optimizer: bool = False, overwrite: bool = False
    ) -> TrainResult:
        """Train to ``total_steps()`` and return a ``TrainResult``.

        On return the Keras model's variables hold the trained values (and a Keras
        optimizer's variables its trained state). While it trains, their old values wait in
        host memory so that the devices hold one copy; if training fails they go back.

        Args:
          resume: ``True`` continues from the newest readable checkpoint in
            ``checkpoint_dir`` (or starts at step 0 if there is none yet); a step number
            continues from that checkpoint. ``steps`` stays the run's total.
          reset_optimizer: with ``resume``, keep the weights, step and data position but start
            a fresh optimizer state (for a deliberate change of optimizer).
          overwrite: without ``resume``, delete the checkpoints ``checkpoint_dir`` already
            holds (a fresh run into a directory with checkpoints is refused otherwise).

        Raises:
          TrainingStopped: after a clean stop on SIGTERM or Ctrl-C; the state was saved.
          Diverged: the loss or gradients stopped being finite (``on_nonfinite``); the
            non-finite state was not saved.
        """
        started = time.perf_counter()
        total = self.total_steps()
        stream = feed.DataStream(self.train_data)
        shape = feed.check_first_batch(
            stream.peek(), data_parallel_size(self.mesh), self.config.grad_accum_steps
        )
        restored = resume_point(
            self.sinks.checkpoints, self.state_template, resume, reset_optimizer, overwrite
        )
        state = restored.state if restored else self.initial_state()
        start = int(state.step)
        if start >= total:
            raise ConfigError(
                f"The run is already at step {start} and steps is {total}: steps counts the "
                f"run's total, so ask for more than {start}."
            )
        stream.set_state(
            {"consumed": start, "iterator": restored.record.data_position if restored else None}
        )
        batches = feed.prefetch_to_device(stream, self.batch_sharding, shape)
        result, status = None, "FAILED"
        last_loss = restored.record.loss if restored else None
        eval_loss = restored.record.eval_loss if restored else None
        placed = state_lib.state_bytes(state)
        self.callbacks.on_train_start(self._run_info(start, total, restored, placed))
        tokens = shape[0] * shape[1]
        cost = StepCost(_count(self.model.weights), tokens, self.mesh.devices.flat)
        # The state's size is measured, not configured (and differs by optimizer): a metric.
        sizes = {"state_bytes": placed["total"], "state_bytes_per_device": placed["per_device"]}
        clock = Clock(tokens_per_step=tokens, since=started, cost=cost, once=sizes)
        guard = NonfiniteGuard(self.config.on_nonfinite, self.config.nonfinite_patience)
        with StopRequests() as stop, parked_on_host(self._held_variables()):
            try:
                trained = self._steps(state, batches, total, clock, guard)
                for step, state, metrics, position in trained:
                    stopping = self._stop_signal(stop, step, total)
                    if every(self.config.log_every, step, total) or stopping:
                        logged = clock.host_metrics(metrics, step)
                        diverged, last_loss = guard.read(logged), logged.get("loss")
                        self.callbacks.on_log(step, logged)
                        if diverged:
                            raise self._diverged(step, diverged)
                    # Evaluated before the step is reported, so its checkpoint records it.
                    due = every(self.config.eval_every, step, total, only_last=True)
                    if self.eval_data is not None and due and not stopping:
                        evaluated, stopping = self._evaluate(state, step, stop)
                        eval_loss = eval_loss if evaluated is None else evaluated
                    failed = self._sink_failure(step, total)
                    halt = bool(stopping or failed)
                    self.callbacks.on_step(StepRecord(step, state, position, clock.elapsed(), halt))
                    if failed:
                        self._write_back(state)
                        raise self._store_failed(step, failed)
                    if stopping:
                        self._write_back(state)
                        raise TrainingStopped(stopping, step)
                self._write_back(state)
                self.state = state
                result = TrainResult(
                    step, last_loss, eval_loss, clock.elapsed(), clock.compile_seconds,
                    clock.last, state_bytes=placed,
                )  # fmt: skip
                status = "FINISHED"
                return result
            except (KeyboardInterrupt, Diverged) as stopped:
                status = "DIVERGED" if isinstance(stopped, Diverged) else "KILLED"
                raise
            finally:
                self.callbacks.on_train_end(status, result)

    def _steps(
        self, state: TrainState, batches: Iterator, total: int, clock: Clock, guard: Any
    ) -> Iterator[tuple[int, TrainState, dict, Any]]:
        """Run the compiled step to ``total``: ``(step, state, device metrics, position)``."""
        step = first = int(state.step)
        while step < total:
            batch, position = next(batches)
            state, metrics = self.steps.train_step(state, batch)
            step += 1
            clock.stepped(metrics, step)
            if clock.cost is not None and step == first + 1:  # its lowering is cached now
                shapes = jax.tree.map(_abstract, (state, batch))
                clock.cost.analyse(lambda shapes=shapes: self.steps.train_step.lower(*shapes))
            guard.stepped(metrics)
            yield step, state, metrics, position.get("iterator")

    def _run_info(
        self, start: int, total: int, restored: Restored | None, placed: dict | None = None
    ) -> RunInfo:
        return RunInfo(
            config=self.config,
            model=self.model,
            optimizer=self.adapter.optimizer,
            description=self.description,
            num_params=_count(
                v for v in self.model.variables if not v.path.endswith(state_lib.SEED_STATE)
            ),
            num_trainable_params=_count(self.model.trainable_variables),
            mesh_shape=dict(self.mesh.shape),
            start_step=start,
            total_steps=total,
            run_uid=restored.record.run_uid if restored else new_run_uid(),
            key_groups=self.key_groups,
            resumed_from=restored.record if restored else None,
            optimizer_change=restored.optimizer_change if restored else None,
            data=self.train_data.summary() if hasattr(self.train_data, "summary") else None,
            base_model=base_model_of(self.model),
            state_bytes=placed or {},
        )

    def _last_checkpoint(self) -> int | None:
        """The newest complete checkpoint's step, once the save in flight is written."""
        store = self.sinks.checkpoints
        saved = (store.wait() or store.steps()) if store is not None else []
        return saved[-1] if saved else None

    def _diverged(self, step: int, reason: str) -> Diverged:
        store = self.sinks.checkpoints
        return Diverged(step, reason, self._last_checkpoint(), store and store.directory)

    def _store_failed(self, step: int, failure: Exception) -> StoreFailed:
        saved = self._last_checkpoint()
        where = (
            f"step {saved} is checkpointed in {str(self.sinks.checkpoints.directory)!r}"
            if saved is not None
            else "no checkpoint was saved"
        )
        return StoreFailed(
            f"{failure}; the run stopped after step {step} and {where}: fix the store or "
            "choose another, then resume."
        )

    def _sink_failure(self, step: int, total: int) -> Exception | None:
        """A sink's reason to stop; with several processes, agreed at logging steps."""
        failure = self.callbacks.failure()
        if jax.process_count() == 1:
            return failure
        if step % self.config.log_every and step != total:
            return None
        if distributed.agreed_signal(1 if failure is not None else None) is None:
            return None
        return failure or StoreFailed("a store that process 0 reports to failed")

    def _stop_signal(self, stop: StopRequests, step: int, total: int) -> int | None:
        """The signal to stop on after this step; several processes agree at logging steps."""
        if jax.process_count() > 1 and step % self.config.log_every and step != total:
            return None
        return distributed.agreed_signal(stop.signum)

    def _evaluate(
        self, state: TrainState, step: int, stop: StopRequests
    ) -> tuple[float | None, int | None]:
        """Mean token loss over ``eval_data`` (or ``eval_steps`` batches of it), and the stop
        signal that cut the pass short (then the loss is ``None`` and nothing is reported).
        """
        signal: list[int] = []

        def stopped() -> bool:
            # A collective with several processes: each reads the same batches, so all ask.
            if not signal and (agreed := distributed.agreed_signal(stop.signum)) is not None:
                signal.append(agreed)
            return bool(signal)

        batches = feed.eval_batches(
            self.eval_data,
            self.batch_sharding,
            data_parallel_size(self.mesh),
            self.config.eval_steps,
            stopped,
        )
        # A schedule-free optimizer trains at one point and is evaluated at its average.
        evaluate = functools.partial(
            self.steps.eval_step, state.params, state.opt_state, state.non_trainable
        )
        sums = [evaluate(batch) for batch in batches]
        if signal:
            return None, signal[0]
        eval_loss = float(sum(s for s, _ in sums)) / max(float(sum(c for _, c in sums)), 1.0)
        metrics = {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 80.0))}
        self.callbacks.on_eval(step, metrics)
        return eval_loss, None

    def _write_back(self, state: TrainState) -> None:
        """Give the trained values back to the Keras objects the user holds."""
        state_lib.write_back(state, self.model, self.key_groups, self.adapter)

    def _held_variables(self) -> list[keras.Variable]:
        """The Keras objects' own variables: the model's and the optimizer's (if it has any)."""
        return [*self.model.variables, *self.adapter.variables]


def _count(variables) -> int:
    """Number of elements in ``variables``."""
    return int(sum(np.prod(v.shape, dtype=np.int64) for v in variables))


def _abstract(array: jax.Array) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=array.sharding)
