"""The Trainer: owns the loop, compiles the step once, and reports to callbacks.

Read ``Trainer.train`` top to bottom: build the state, then step, log, evaluate, repeat.
Everything else (tracking, checkpoints, progress) is a callback.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import keras
import numpy as np

from kithara_ops import distributed, feed
from kithara_ops import state as state_lib
from kithara_ops.callbacks import Callback, CallbackList, RunInfo, TrainResult
from kithara_ops.checkpoint import Checkpointer
from kithara_ops.config import RunConfig
from kithara_ops.errors import ConfigError
from kithara_ops.interrupt import StopRequests, TrainingStopped
from kithara_ops.models import layout_rules_of
from kithara_ops.optim import as_adapter
from kithara_ops.optim.describe import describe_optimizer
from kithara_ops.restore import restore_latest
from kithara_ops.sharding import (
    LayoutRule,
    batch_sharding,
    data_parallel_size,
    make_mesh,
    parameter_shardings,
    replicated,
)
from kithara_ops.state import TrainState, parked_on_host, variable_keys
from kithara_ops.step import StepBuilder
from kithara_ops.tracking import MlflowTracker

log = logging.getLogger("kithara_ops")


class Trainer:
    """Trains a Keras model on JAX with a Keras or an Optax optimizer, sharded over a mesh.

    Args:
      model: a built ``keras.Model`` mapping token ids ``(batch, seq)`` to logits.
      optimizer: a ``keras.optimizers.Optimizer`` or an ``optax.GradientTransformation``.
      train_data: an iterable of batches (mappings with ``x``, ``y`` and optional ``mask``),
        e.g. ``kithara_ops.data.load(...)``; re-iterated at the end of each pass.
      eval_data: optional re-iterable of eval batches.
      config: a ``RunConfig``; keyword ``options`` override its fields.
      callbacks: extra ``Callback`` objects, called in order after the built-in ones (the
        MLflow tracker, unless ``tracking=False``).
      layout_rules: ``[(regex, spec), ...]`` placing parameters under ``fsdp``; defaults to
        ``model.get_layout_rules()`` when the model has it, else a size-based rule.
      devices: devices for the mesh (default: all).
      **options: any ``RunConfig`` field, e.g. ``steps=100, sharding="fsdp", seed=1``.

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
        self.adapter = as_adapter(optimizer, model.trainable_variables)
        self.description = describe_optimizer(self.adapter.optimizer)
        if config is None:
            # Objects, not specs: recorded as <description>, which no builder will take for
            # a spec, so a rebuild from this config asks for the objects instead.
            described = {
                "model": f"<{model.name}>",
                "data": f"<{type(train_data).__name__}>",
                "optimizer": f"<{self.description['label']}>",
            }
            config = RunConfig.from_dict({**described, **options})
        elif options:
            config = config.replace(**options)
        if config.coordinator is not None:  # build_trainer does it before building the model
            distributed.initialize(config.coordinator, config.num_processes, config.process_id)
        self.config = config
        self.model = model
        self.train_data = train_data
        self.eval_data = eval_data
        self.tracker = MlflowTracker(config) if config.tracking else None
        self.checkpointer = (
            Checkpointer(config.checkpoint_dir, config.save_every, config.keep, config.keep_best)
            if config.checkpoint_dir
            else None
        )
        # The checkpointer comes after the tracker so a save records the run id it created.
        builtin = [c for c in (self.tracker, self.checkpointer) if c is not None]
        self.callbacks = CallbackList(builtin + list(callbacks))
        self.data_state: dict = {}
        self._last_metrics: dict = {}
        self._last_eval: float | None = None
        self.mesh = make_mesh(config.sharding, config.mesh_shape, devices)
        self.layout_rules = list(
            layout_rules if layout_rules is not None else layout_rules_of(model)
        )
        self._build_steps()

    # ----------------------------------------------------------------------------- set-up
    def _build_steps(self) -> None:
        """Decide every sharding once and compile-wrap the steps (compiled on first call)."""
        model, config, mesh = self.model, self.config, self.mesh
        self.param_keys = variable_keys(model.trainable_variables)
        self.non_trainable_keys = variable_keys(model.non_trainable_variables)
        shapes = {k: tuple(v.shape) for k, v in zip(self.param_keys, model.trainable_variables)}
        self.param_shardings = parameter_shardings(
            mesh, shapes, self.layout_rules, config.min_shard_size
        )
        repl = replicated(mesh)
        self.batch_sharding = batch_sharding(mesh)
        abstract_params = {
            k: jax.ShapeDtypeStruct(shapes[k], v.dtype)
            for k, v in zip(self.param_keys, model.trainable_variables)
        }
        abstract_opt = jax.eval_shape(self.adapter.init, abstract_params)
        opt_shardings = self.adapter.state_shardings(abstract_opt, self.param_shardings, repl)
        self.state_shardings = TrainState(
            step=repl,
            params=self.param_shardings,
            non_trainable={k: repl for k in self.non_trainable_keys},
            opt_state=opt_shardings,
            rng=repl,
        )
        micro = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))
        builder = StepBuilder(
            model,
            self.adapter,
            self.param_keys,
            self.non_trainable_keys,
            config.grad_accum_steps,
            micro_batch_sharding=micro if config.grad_accum_steps > 1 else None,
        )
        if getattr(self.adapter, "init_on_host", False):
            # Initial values read from the optimizer's own variables: under jit they would
            # become constants of the executable and stay on the device as long as it does.
            def init_opt(params):
                return jax.device_put(self.adapter.init(params), opt_shardings, may_alias=False)

            self._init_opt = init_opt
        else:  # Optax state is built on the devices, already sharded
            self._init_opt = jax.jit(self.adapter.init, out_shardings=opt_shardings)
        self._train_step = jax.jit(
            builder.train_step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, repl),
            donate_argnums=0,
        )
        self._eval_step = jax.jit(
            builder.eval_step,
            in_shardings=(
                self.param_shardings,
                self.state_shardings.non_trainable,
                self.batch_sharding,
            ),
            out_shardings=(repl, repl),
        )

    def initial_state(self) -> TrainState:
        """A fresh state from the model's current variables, placed on the mesh."""
        return state_lib.initial_state(
            self.model, self.state_shardings, self._init_opt, self.config.seed
        )

    def abstract_state(self) -> TrainState:
        """The state's shapes, dtypes and shardings, without any arrays (for restoring)."""
        return state_lib.abstract_state(self.initial_state, self.state_shardings)

    def init_optimizer_state(self, params: dict) -> Any:
        """A fresh optimizer state for ``params``, placed like the parameters."""
        return self._init_opt(params)

    def variable_key_groups(self) -> dict[str, list[str]]:
        """The state's variable keys by group, in the model's (and optimizer's) order."""
        groups = {"params": self.param_keys, "non_trainable": self.non_trainable_keys}
        state_keys = getattr(self.adapter, "state_keys", None)
        if state_keys is not None:
            groups["opt"] = state_keys
        return groups

    def total_steps(self) -> int:
        """The step the run stops at, from ``steps``, or ``epochs`` x batches per pass."""
        if self.config.steps is not None:
            return self.config.steps
        length = len(self.train_data) if hasattr(self.train_data, "__len__") else None
        if length is None:
            raise ConfigError(
                "train_data has no length, so the number of steps is unknown: pass steps=N."
            )
        return (self.config.epochs or 1) * length

    # ------------------------------------------------------------------------------ loop
    def train(self, resume: bool | int = False, reset_optimizer: bool = False) -> TrainResult:
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

        Raises:
          TrainingStopped: after a clean stop on SIGTERM or Ctrl-C; the state was saved.
        """
        started = time.perf_counter()
        total = self.total_steps()
        stream = feed.DataStream(self.train_data)
        shape = feed.check_first_batch(
            next(stream), data_parallel_size(self.mesh), self.config.grad_accum_steps
        )
        if self.config.data.startswith("<"):
            # Data given as an object: the config records the batch shape it really has.
            self.config = self.config.replace(batch_size=shape[0], seq_len=shape[1])
        state, position = self._starting_point(resume, reset_optimizer)
        stream.set_state(position)
        step = int(state.step)
        if step >= total:
            raise ConfigError(
                f"The run is already at step {step} and steps is {total}: steps counts the "
                f"run's total, so ask for more than {step}."
            )
        batches = feed.prefetch_to_device(stream, self.batch_sharding, shape)
        tokens_per_step = shape[0] * shape[1]
        self.callbacks.on_train_start(self._run_info(step, total))

        status, result, eval_loss = "FAILED", None, self._last_eval
        with StopRequests() as stop, parked_on_host(self._keras_variables()):
            try:
                compile_seconds, mark, mark_step = 0.0, time.perf_counter(), step
                while step < total:
                    batch, self.data_state = next(batches)
                    state, metrics = self._train_step(state, batch)
                    step += 1
                    if step == mark_step + 1 and compile_seconds == 0.0:
                        # Timing the first step tells compilation apart from steady speed.
                        jax.block_until_ready(metrics)
                        compile_seconds = time.perf_counter() - mark
                        mark, mark_step = time.perf_counter(), step
                    stopping = self._stop_signal(stop, step, total)
                    if step % self.config.log_every == 0 or step == total or stopping:
                        self._last_metrics = self._host_metrics(
                            metrics, step - mark_step, mark, tokens_per_step
                        )
                        mark, mark_step = time.perf_counter(), step
                        self.callbacks.on_log(step, self._last_metrics)
                    # Evaluate before the step is reported, so a checkpoint of this step
                    # records this step's eval loss.
                    every = self.config.eval_every
                    due = step == total or (every and step % every == 0)
                    if self.eval_data is not None and due and not stopping:
                        eval_loss = self._evaluate(state, step)
                    self.callbacks.on_step(step, state)
                    if stopping:
                        self._write_back(state)
                        raise TrainingStopped(stopping, step)
                self._write_back(state)
                self.state = state
                result = TrainResult(
                    step=step,
                    loss=self._last_metrics.get("loss"),
                    eval_loss=eval_loss,
                    seconds=time.perf_counter() - started,
                    compile_seconds=compile_seconds,
                    metrics=self._last_metrics,
                )
                status = "FINISHED"
                return result
            except KeyboardInterrupt:
                status = "KILLED"
                raise
            finally:
                self.callbacks.on_train_end(status, result)
                if result is not None and self.tracker is not None:
                    result.run_id = self.tracker.run_id

    def _starting_point(self, resume: bool | int, reset_optimizer: bool) -> tuple[TrainState, dict]:
        """A fresh state, or the checkpoint's, and the data position that goes with it."""
        fresh_position = {"consumed": 0, "epoch": 0, "iterator": None}
        if resume is False or resume is None:
            return self.initial_state(), fresh_position
        if self.checkpointer is None:
            raise ConfigError("resume needs a checkpoint directory: pass checkpoint_dir=DIR.")
        if resume is True and not self.checkpointer.steps():
            log.info("No checkpoint in %s yet: starting at step 0.", self.checkpointer.directory)
            return self.initial_state(), fresh_position
        restored = restore_latest(self, self.checkpointer, resume, reset_optimizer)
        if self.tracker is not None:
            self.tracker.continue_run(
                restored.meta.get("mlflow") or {}, restored.step, restored.optimizer_change
            )
        self._last_eval = restored.meta.get("eval_loss")
        self._last_metrics = {"loss": restored.meta["loss"]} if restored.meta.get("loss") else {}
        return restored.state, restored.meta.get("data", fresh_position)

    def progress(self) -> dict:
        """Where the run is, as JSON-safe values: what a checkpoint records beside the state."""
        tracker = self.tracker
        return {
            "epoch": self.data_state.get("epoch", 0),
            "data": self.data_state,
            "loss": self._last_metrics.get("loss"),
            "eval_loss": self._last_eval,
            "config": self.config.without_launch().to_dict(),
            "optimizer": self.description,
            "keys": self.variable_key_groups(),
            "mlflow": {
                "run_id": tracker.run_id if tracker else None,
                "tracking_uri": tracker.writer.tracking_uri if tracker and tracker.writer else None,
                "experiment": tracker.experiment if tracker else None,
            },
        }

    def _stop_signal(self, stop: StopRequests, step: int, total: int) -> int | None:
        """The signal to stop on after this step; several processes agree at logging steps."""
        if jax.process_count() > 1 and step % self.config.log_every and step != total:
            return None
        return distributed.agreed_signal(stop.signum)

    def _host_metrics(self, metrics, steps: int, since: float, tokens_per_step: int) -> dict:
        """Fetch one step's metrics (the only host sync of a logging interval) and add speed."""
        values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "tokens"}
        elapsed = time.perf_counter() - since
        if steps > 0 and elapsed > 0:
            values["step_time_seconds"] = elapsed / steps
            values["tokens_per_second"] = tokens_per_step * steps / elapsed
        return values

    def _evaluate(self, state: TrainState, step: int) -> float:
        """Mean token loss over ``eval_data`` (or ``eval_steps`` batches of it)."""
        loss_sum, count, shape = 0.0, 0.0, None
        for i, batch in enumerate(self.eval_data):
            if self.config.eval_steps is not None and i >= self.config.eval_steps:
                break
            if shape is None:
                shape = feed.check_first_batch(batch, data_parallel_size(self.mesh), 1)
            device_batch = feed.to_device(feed.to_host_arrays(batch, shape), self.batch_sharding)
            s, c = self._eval_step(state.params, state.non_trainable, device_batch)
            loss_sum, count = loss_sum + s, count + c
        if shape is None:
            raise ConfigError("eval_data yielded no batches: check the eval source and batch size.")
        eval_loss = float(loss_sum) / max(float(count), 1.0)
        metrics = {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 80.0))}
        self._last_eval = eval_loss
        self.callbacks.on_eval(step, metrics)
        return eval_loss

    def _write_back(self, state: TrainState) -> None:
        """Give the trained values back to the Keras objects the user holds."""
        # In a multi-process run, full copies are gathered first (all processes take part).
        params, non_trainable = distributed.process_local((state.params, state.non_trainable))
        for key, var in zip(self.param_keys, self.model.trainable_variables):
            var.assign(params[key])
        for key, var in zip(self.non_trainable_keys, self.model.non_trainable_variables):
            var.assign(non_trainable[key])
        write_back = getattr(self.adapter, "write_back", None)
        if write_back is not None:
            write_back(distributed.process_local(state.opt_state))

    def _keras_variables(self) -> list[keras.Variable]:
        """The Keras model's variables, and a Keras optimizer's."""
        optimizer_variables = (
            self.adapter.optimizer.variables if self.adapter.family == "keras" else []
        )
        return [*self.model.variables, *optimizer_variables]

    def _run_info(self, start_step: int, total: int) -> RunInfo:
        return RunInfo(
            config=self.config,
            model=self.model,
            optimizer=self.adapter.optimizer,
            optimizer_family=self.adapter.family,
            num_params=int(sum(np.prod(v.shape) for v in self.model.trainable_variables)),
            mesh_shape=dict(self.mesh.shape),
            start_step=start_step,
            total_steps=total,
            progress=self.progress,
        )
