"""The Trainer: the loop, and nothing else.

A ``Program`` (the compiled steps on their mesh) and a ``Start`` (the state to begin from)
are decided before the loop exists. ``Trainer.run`` reads top to bottom: step, log,
evaluate, sample, report, repeat. Tracking, checkpoints and progress are sinks that read only the
events the loop hands them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import keras

from kithara_ops import feed, halts, samples
from kithara_ops.callbacks import Callback, CallbackList, StepRecord, TrainResult
from kithara_ops.config import RunConfig
from kithara_ops.errors import Diverged
from kithara_ops.interrupt import StopRequests
from kithara_ops.optim import as_adapter
from kithara_ops.optim.describe import describe_optimizer
from kithara_ops.program import Program, require_built
from kithara_ops.sharding import LayoutRule, data_parallel_size
from kithara_ops.sinks import Sinks, build_sinks
from kithara_ops.start import Start, decide_start, final_config, run_info
from kithara_ops.state import TrainState, parked_on_host
from kithara_ops.stopping import check_stopping_has_eval
from kithara_ops.timing import Progress, every


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
        config names the objects given by their labels (``Program.given`` lists them).
      callbacks: extra ``Callback`` objects, called after the sinks the config asks for.
      sinks: the sinks to report to, from ``kithara_ops.sinks.build_sinks``; by default
        built from the config (MLflow tracker, checkpointer) plus ``callbacks``.
      layout_rules: ``[(regex, spec), ...]`` placing parameters and frozen weights under
        ``fsdp``, or a Keras ``LayoutMap`` (e.g. KerasHub's ``get_layout_map``); defaults to
        ``model.get_layout_rules()`` when the model has it, else a size-based rule.
      devices: devices for the mesh (default: all).
      **options: any ``RunConfig`` field, e.g. ``steps=100, sharding="fsdp", seed=1``;
        ``seed`` also draws the LoRA matrices of a ``models.from_preset`` model loaded
        without a seed of its own.

    This builds a ``Program`` from the objects; ``Trainer.from_program`` takes one built.

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
        require_built(model)
        adapter = as_adapter(optimizer, model.trainable_variables)
        description = describe_optimizer(adapter.optimizer)
        config, given, train_data = final_config(
            model, description["label"], train_data, config, options
        )
        program = Program(model, adapter, config, layout_rules=layout_rules, devices=devices,
                          description=description, given=given)  # fmt: skip
        sinks = sinks if sinks is not None else build_sinks(config, callbacks)
        self._bind(program, train_data, eval_data, sinks)

    @classmethod
    def from_program(
        cls,
        program: Program,
        train_data: Iterable[Mapping],
        *,
        eval_data: Iterable[Mapping] | None = None,
        sinks: Sinks | None = None,
    ) -> Trainer:
        """The loop over a program already built (by ``build`` or by hand)."""
        trainer = cls.__new__(cls)
        trainer._bind(program, train_data, eval_data, sinks or build_sinks(program.config))
        return trainer

    def _bind(self, program: Program, train_data, eval_data, sinks: Sinks) -> None:
        self.program, self.train_data, self.eval_data, self.sinks = (
            program, train_data, eval_data, sinks
        )  # fmt: skip
        self.callbacks = CallbackList(sinks.callbacks)
        self.samples = samples.for_program(program)
        if eval_data is not None:
            feed.check_eval_source(eval_data, program.config.eval_steps)
        check_stopping_has_eval(program.config, eval_data is not None)
        # The program's parts under the names callers and callbacks have used.
        self.model, self.config, self.adapter = program.model, program.config, program.adapter
        self.description, self.mesh, self.steps = program.description, program.mesh, program.steps
        self.key_groups, self.state_shardings = program.key_groups, program.state_shardings
        self.batch_sharding = program.batch_sharding
        self.initial_state, self.state_template = program.fresh_state, program.template

    @property
    def param_keys(self) -> list[str]:
        """Keys of ``state.params``, in the order of ``model.trainable_variables``."""
        return self.key_groups["params"]

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
        started, total = time.perf_counter(), self.total_steps()
        stream = feed.DataStream(self.train_data)
        shape = feed.check_first_batch(
            stream.peek(), data_parallel_size(self.mesh), self.config.grad_accum_steps
        )
        begin = decide_start(
            self.program, self.sinks.checkpoints, resume, reset_optimizer, overwrite
        )
        return self.run(begin, stream, shape, total, started)

    def run(
        self, begin: Start, stream: feed.DataStream, shape: tuple[int, int], total: int,
        started: float,
    ) -> TrainResult:  # fmt: skip
        """Train from ``begin`` to ``total``: the loop itself (see ``train``)."""
        begin.check_before(total, self.config)
        stream.set_state({"consumed": begin.step, "iterator": begin.data_position})
        batches = feed.prefetch_to_device(stream, self.batch_sharding, shape)
        run = Progress.at_start(begin, self.program, shape, started)
        self.callbacks.on_train_start(run_info(self.program, begin, total, run, self.train_data))
        result, status = None, "FAILED"
        with StopRequests() as stop, parked_on_host(self.program.held_variables()):
            try:
                for step, state, metrics, position in self._steps(begin.state, batches, total, run):
                    stopping = halts.stop_signal(stop.signum, step, total, self.config.log_every)
                    self._log(step, total, metrics, stopping, run)
                    # Evaluated before the step is reported, so its checkpoint records it.
                    stopping = self._evaluate_if_due(step, total, state, stop, stopping, run)
                    if self.samples and every(self.config.generate_every, step, total, True):
                        self.callbacks.on_samples(step, self.samples(state, step))
                    failed = halts.sink_failure(
                        self.callbacks.failure(), step, total, self.config.log_every
                    )
                    ended, why = bool(stopping or failed or run.stop_reason), run.stop_reason
                    self.callbacks.on_step(
                        StepRecord(step, state, position, run.clock.elapsed(), ended, why)
                    )
                    if stopping or failed:
                        self.program.write_back(state)
                        raise halts.halted(self.sinks.checkpoints, step, failed, stopping)
                    if run.stop_reason:
                        break  # early: the run ends FINISHED at this step
                self.program.write_back(state)
                self.state, status, result = state, "FINISHED", run.result(step)
                return result
            except (KeyboardInterrupt, Diverged) as stopped:
                status = "DIVERGED" if isinstance(stopped, Diverged) else "KILLED"
                raise
            finally:
                self.callbacks.on_train_end(status, result)

    def _steps(
        self, state: TrainState, batches: Iterator, total: int, run: Progress
    ) -> Iterator[tuple[int, TrainState, dict, Any]]:
        """Run the compiled step to ``total``: ``(step, state, device metrics, position)``."""
        step = int(state.step)
        while step < total:
            batch, position = next(batches)
            state, metrics = self.steps.train_step(state, batch)
            step += 1
            run.stepped(metrics, step, self.steps.train_step, (state, batch))
            yield step, state, metrics, position.get("iterator")

    # --------------------------------------------------------------- hooks over the steps
    def _log(self, step: int, total: int, metrics: Any, stopping: Any, run: Progress) -> None:
        """At logging steps (and before a stop): fetch the metrics, report, check them."""
        if not (every(self.config.log_every, step, total) or stopping):
            return
        logged = run.clock.host_metrics(metrics, step)
        diverged, run.last_loss = run.guard.read(logged), logged.get("loss")
        self.callbacks.on_log(step, logged)
        if diverged:
            raise halts.diverged(self.sinks.checkpoints, step, diverged)

    def _evaluate_if_due(
        self, step: int, total: int, state: TrainState, stop: StopRequests, stopping: Any,
        run: Progress,
    ) -> Any:  # fmt: skip
        """At evaluation steps (and at the last): the mean token loss over ``eval_data``;
        returns ``stopping``, or a signal that cut the pass short (then nothing is reported)."""
        due = every(self.config.eval_every, step, total, only_last=True)
        if self.eval_data is None or not due or stopping:
            return stopping
        watch = halts.SignalWatch(stop)
        batches = feed.eval_batches(
            self.eval_data, self.batch_sharding, data_parallel_size(self.mesh),
            self.config.eval_steps, watch,
        )  # fmt: skip
        eval_loss = self.program.eval_loss(state, batches)
        if watch.signum is not None:
            return watch.signum
        run.evaluated(step, eval_loss, self.config)
        perplexity = math.exp(min(eval_loss, 80.0))
        self.callbacks.on_eval(step, {"eval_loss": eval_loss, "perplexity": perplexity})
        run.stop_reason = run.stop_reason or self.callbacks.stop_request()
        return stopping
