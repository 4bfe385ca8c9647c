"""The learning-rate range test: from a fresh state, the learning rate grows exponentially
step by step until the loss blows up; the steepest descent of the loss suggests a rate.

The optimizer's own learning rate becomes an exponential schedule, so the compiled step is
the run's step with nothing added (an Optax spec gets ``optax.exponential_decay``, a Keras
one ``keras.optimizers.schedules.ExponentialDecay``, both with ``decay_rate > 1``): at step
``i`` (from 0) the rate is ``lr_i = start * (end / start) ** (i / (steps - 1))``.

The suggestion, as fastai's ``lr_find`` makes it: the losses are smoothed by an exponential
moving average with bias correction, ``s_i = EMA_i / (1 - beta ** (i + 1))``; the test
stops once ``loss_i > divergence * min(loss)`` or a loss is not finite; the suggested rate
is the ``lr_i`` where ``d s / d log(lr)`` is most negative, before ``s`` reaches its
minimum. The weights are never written back: the model is as it was.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
from typing import Any

import numpy as np

from kithara_ops.errors import ConfigError
from kithara_ops.optim.search_space import PLACEHOLDER

SMOOTHING = 0.98
"""``beta`` of the loss's exponential moving average."""


@dataclasses.dataclass
class RangeTest:
    """What a range test saw and suggests.

    Attributes:
      learning_rates, losses, smoothed: per step taken, the rate, the training loss and
        the smoothed loss (the non-finite or diverged last step left out).
      suggested_learning_rate: the steepest descent of ``smoothed`` against ``log(lr)``.
      min_loss_learning_rate: the rate at the smoothed loss's minimum.
      stopped: ``diverged`` (the loss exceeded ``divergence`` times its best, or was not
        finite) or ``end`` (the last rate was reached).
      spec: the optimizer spec the test trained, its rate a schedule.
      run_id: the MLflow run it logged, when tracked.
    """

    learning_rates: list[float]
    losses: list[float]
    smoothed: list[float]
    suggested_learning_rate: float
    min_loss_learning_rate: float
    stopped: str
    spec: str
    run_id: str | None = None

    def space(self) -> str:
        """A ``--space`` for a search around the suggestion: a decade on either side."""
        lr = self.suggested_learning_rate
        return f"lr=loguniform({lr / 10:.3g},{lr * 10:.3g})"

    def to_dict(self) -> dict[str, Any]:
        """As JSON values, with the ``space`` to search."""
        return {**dataclasses.asdict(self), "space": self.space()}


def _learning_rate_slot(spec: str) -> tuple[ast.expr, Any, str] | None:
    """The node holding the spec's learning rate: the ``learning_rate=`` keyword, or the
    first positional argument of a call whose first parameter is ``learning_rate``; with
    the call's callable and its family (``optax`` / ``keras``). ``None`` if not exactly one."""
    from kithara_ops.optim.spec import parse_spec, resolve_name

    found = []
    for node in ast.walk(parse_spec(spec)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        fn = resolve_name(name)
        family = "keras" if name.startswith("keras") else "optax"
        for keyword in node.keywords:
            if keyword.arg == "learning_rate":
                found.append((keyword, fn, family))
        if node.args and fn is not None:
            try:
                first = next(iter(inspect.signature(fn).parameters))
            except (TypeError, ValueError, StopIteration):
                continue
            if first == "learning_rate":
                found.append((node, fn, family))
    return found[0] if len(found) == 1 else None


def range_spec(spec: str, start: float, end: float, steps: int) -> str:
    """``spec`` with its learning rate replaced by the test's exponential schedule.

    ``$lr`` marks the rate where the spec has no single obvious one; a bare name
    (``optax.adamw``) takes the schedule as its rate.

    Raises:
      ConfigError: no single learning rate to replace.
    """
    from kithara_ops.optim.spec import resolve_name

    if not 0 < start < end:
        raise ConfigError(f"--start-lr {start:g} and --end-lr {end:g} need 0 < start < end.")
    if steps < 3:
        raise ConfigError(f"--steps {steps} is too few for a range test: take at least 3.")
    rate = (end / start) ** (1.0 / (steps - 1))
    names = set(PLACEHOLDER.findall(spec))
    family = "keras" if spec.strip().startswith("keras") else "optax"
    if names - {"lr"}:
        raise ConfigError(f"{spec!r}: a range test fills only $lr; give the other values.")
    if not names and "(" not in spec and resolve_name(spec.strip()) is not None:
        spec, names = f"{spec.strip()}($lr)", {"lr"}
    if not names:
        slot = _learning_rate_slot(spec)
        if slot is None:
            raise ConfigError(
                f"{spec!r} has no single learning rate to sweep: write $lr where it goes, "
                "e.g. 'optax.chain(optax.clip_by_global_norm(1.0), optax.adamw($lr))'."
            )
        spec, family = _mark_slot(spec, slot), slot[2]
    schedule = (
        f"keras.optimizers.schedules.ExponentialDecay(initial_learning_rate={start!r}, "
        f"decay_steps=1, decay_rate={rate!r})"
        if family == "keras"
        else f"optax.exponential_decay(init_value={start!r}, transition_steps=1, "
        f"decay_rate={rate!r})"
    )
    return spec.replace("$lr", schedule)


def _mark_slot(spec: str, slot: tuple) -> str:
    """``spec`` with the learning rate node of ``slot`` written as ``$lr``."""
    from kithara_ops.optim.spec import parse_spec

    tree = parse_spec(spec)
    target = ast.unparse(slot[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "learning_rate":
            if ast.unparse(node) == target:
                node.value = ast.Name("__lr__")
        elif isinstance(node, ast.Call) and ast.unparse(node) == target:
            node.args[0] = ast.Name("__lr__")
    return ast.unparse(tree).replace("__lr__", "$lr")


def smooth(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average: ``s_i = EMA_i / (1 - beta ** (i + 1))``."""
    out, average = [], 0.0
    for i, loss in enumerate(losses):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta ** (i + 1)))
    return out


def suggest(learning_rates: list[float], smoothed: list[float]) -> tuple[float, float]:
    """``(steepest, minimum)``: the rate of the most negative ``d smoothed / d log(lr)``
    before the minimum of ``smoothed``, and the rate at that minimum."""
    if len(smoothed) < 3:
        raise ConfigError(
            f"The loss diverged after {len(smoothed)} steps: start lower (--start-lr)."
        )
    lowest = int(np.argmin(smoothed))
    slopes = np.gradient(np.asarray(smoothed), np.log(np.asarray(learning_rates)))
    steepest = int(np.argmin(slopes[: max(lowest, 1) + 1]))
    return float(learning_rates[steepest]), float(learning_rates[lowest])


def run_range_test(trainer: Any, start: float, end: float, steps: int, divergence: float,
                   spec: str) -> RangeTest:  # fmt: skip
    """Train ``trainer``'s program from a fresh state for up to ``steps`` steps, reading the
    loss after each; the Keras model's variables are left as they were."""
    from kithara_ops import feed
    from kithara_ops.sharding import data_parallel_size
    from kithara_ops.state import parked_on_host

    program = trainer.program
    stream = feed.DataStream(trainer.train_data)
    shape = feed.check_first_batch(
        stream.peek(), data_parallel_size(program.mesh), program.config.grad_accum_steps
    )
    batches = feed.prefetch_to_device(stream, program.batch_sharding, shape)
    state, rate = program.fresh_state(), (end / start) ** (1.0 / (steps - 1))
    rates, losses, stopped = [], [], "end"
    with parked_on_host(program.held_variables()):
        for i in range(steps):
            batch, _ = next(batches)
            state, metrics = program.steps.train_step(state, batch)
            loss = float(metrics["loss"])
            if not math.isfinite(loss) or (losses and loss > divergence * min(losses)):
                stopped = "diverged"
                break
            rates.append(start * rate**i)
            losses.append(loss)
    smoothed = smooth(losses)
    steepest, lowest = suggest(rates, smoothed)
    return RangeTest(rates, losses, smoothed, steepest, lowest, stopped, spec)


def lr_find(config: Any, *, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100,
            divergence: float = 4.0) -> RangeTest:  # fmt: skip
    """The range test of ``config.optimizer`` on ``config``'s model and data (untracked).

    Example:
      >>> test = lr_find(RunConfig(optimizer="optax.adamw"))  # doctest: +SKIP
      >>> test.suggested_learning_rate  # doctest: +SKIP
    """
    from kithara_ops.build import build_trainer

    if divergence <= 1:
        raise ConfigError(f"--divergence {divergence:g} must be above 1, e.g. 4.")
    spec = range_spec(config.optimizer, start_lr, end_lr, steps)
    run = config.replace(optimizer=spec, steps=steps, epochs=None, tracking=False,
                         checkpoint_dir=None, eval_data=None, log_every=1)  # fmt: skip
    return run_range_test(build_trainer(run), start_lr, end_lr, steps, divergence, spec)
