"""The Trainer: owns the loop, compiles the step once, and reports to callbacks.

Read ``Trainer.train`` top to bottom: build the state, then step, log, evaluate, repeat.
Everything else (tracking, checkpoints, progress) is a callback.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import keras
import numpy as np

from kithara_ops import feed
from kithara_ops.callbacks import Callback, CallbackList, RunInfo, TrainResult
from kithara_ops.config import RunConfig
from kithara_ops.errors import ConfigError
from kithara_ops.models import layout_rules_of
from kithara_ops.optim import as_adapter
from kithara_ops.optim.describe import describe_optimizer
from kithara_ops.sharding import (
    LayoutRule,
    batch_sharding,
    data_parallel_size,
    make_mesh,
    parameter_shardings,
    replicated,
)
from kithara_ops.state import TrainState, variable_keys
from kithara_ops.step import StepBuilder
from kithara_ops.tracking import MlflowTracker


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
        if config is None:
            # Objects, not specs: recorded as <description>, which no builder will take for
            # a spec, so a rebuild from this config asks for the objects instead.
            described = {
                "model": f"<{model.name}>",
                "data": f"<{type(train_data).__name__}>",
                "optimizer": f"<{describe_optimizer(optimizer)['label']}>",
            }
            config = RunConfig.from_dict({**described, **options})
        elif options:
            config = config.replace(**options)
        self.config = config
        self.model = model
        self.train_data = train_data
        self.eval_data = eval_data
        self.tracker = MlflowTracker(config) if config.tracking else None
        self.callbacks = CallbackList([c for c in (self.tracker,) if c] + list(callbacks))
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
        put = lambda value, sharding: jax.device_put(value, sharding, may_alias=False)  # noqa: E731
        params = {
            k: put(v.value, self.param_shardings[k])
            for k, v in zip(self.param_keys, self.model.trainable_variables)
        }
        non_trainable = {
            k: put(v.value, self.state_shardings.non_trainable[k])
            for k, v in zip(self.non_trainable_keys, self.model.non_trainable_variables)
        }
        return TrainState(
            step=put(np.int32(0), self.state_shardings.step),
            params=params,
            non_trainable=non_trainable,
            opt_state=self._init_opt(params),
            rng=put(jax.random.PRNGKey(self.config.seed), self.state_shardings.rng),
        )

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
    def train(self) -> TrainResult:
        """Train to ``total_steps()`` and return a ``TrainResult``.

        On return the Keras model's variables hold the trained values (and a Keras
        optimizer's variables its trained state).
        """
        started = time.perf_counter()
        state = self.initial_state()
        total = self.total_steps()
        stream = feed.DataStream(self.train_data)
        first = next(stream)
        shape = feed.check_first_batch(
            first, data_parallel_size(self.mesh), self.config.grad_accum_steps
        )
        stream.set_state({"consumed": 0, "epoch": 0, "iterator": None})
        batches = feed.prefetch_to_device(stream, self.batch_sharding, shape)
        tokens_per_step = shape[0] * shape[1]
        self.callbacks.on_train_start(self._run_info(int(state.step), total))

        status, result = "FAILED", None
        try:
            step, last, eval_loss = int(state.step), {}, None
            compile_seconds, mark, mark_step = 0.0, time.perf_counter(), step
            while step < total:
                batch, self.data_state = next(batches)
                state, metrics = self._train_step(state, batch)
                step += 1
                if step == mark_step + 1 and compile_seconds == 0.0:
                    # Timing the first step tells compilation apart from steady-state speed.
                    jax.block_until_ready(metrics)
                    compile_seconds = time.perf_counter() - mark
                    mark, mark_step = time.perf_counter(), step
                self.callbacks.on_step(step, state)
                if step % self.config.log_every == 0 or step == total:
                    last = self._host_metrics(metrics, step - mark_step, mark, tokens_per_step)
                    mark, mark_step = time.perf_counter(), step
                    self.callbacks.on_log(step, last)
                if self.config.eval_every and step % self.config.eval_every == 0 and step < total:
                    eval_loss = self._evaluate(state, step)
            if self.eval_data is not None:
                eval_loss = self._evaluate(state, step)
            self._write_back(state)
            self.state = state
            result = TrainResult(
                step=step,
                loss=last.get("loss"),
                eval_loss=eval_loss,
                seconds=time.perf_counter() - started,
                compile_seconds=compile_seconds,
                metrics=last,
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
            device_batch = jax.device_put(feed.to_host_arrays(batch, shape), self.batch_sharding)
            s, c = self._eval_step(state.params, state.non_trainable, device_batch)
            loss_sum, count = loss_sum + s, count + c
        if shape is None:
            raise ConfigError("eval_data yielded no batches: check the eval source and batch size.")
        eval_loss = float(loss_sum) / max(float(count), 1.0)
        metrics = {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 80.0))}
        self.callbacks.on_eval(step, metrics)
        return eval_loss

    def _write_back(self, state: TrainState) -> None:
        """Give the trained values back to the Keras objects the user holds."""
        for key, var in zip(self.param_keys, self.model.trainable_variables):
            var.assign(state.params[key])
        for key, var in zip(self.non_trainable_keys, self.model.non_trainable_variables):
            var.assign(state.non_trainable[key])
        write_back = getattr(self.adapter, "write_back", None)
        if write_back is not None:
            write_back(state.opt_state)

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
        )
