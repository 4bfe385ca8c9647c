"""A run's best losses so far, and when they say the run should end early.

``Bests`` is fed the same events by each part that needs it: the loop (to stop), the
checkpointer (to record where the run stood, so that a resume continues the count) and the
tracker (to log ``best_loss``, ``best_eval_loss``, ``best_step`` and ``steps_to_target`` as
the run goes, because MLflow's runs table shows last values). Being a pure function of the
logged losses, every copy holds the same numbers, on every process.

The rule, as Keras' ``EarlyStopping`` and Optuna's patience pruner have it: an evaluation
*improves* when ``eval_loss < best - min_delta``; after ``patience`` evaluations in a row
that do not, the run stops. A ``target`` ends the run at the first evaluation with
``eval_loss <= target``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

EARLY_STOP = "early_stop"
"""``stop_reason`` of a run stopped because ``eval_loss`` stopped improving."""
TARGET_REACHED = "target_eval_loss"
"""``stop_reason`` of a run stopped because ``eval_loss`` reached its target."""
PRUNED = "pruned"
"""``stop_reason`` of a search trial its pruner ended (MLflow status ``KILLED``)."""


@dataclasses.dataclass
class Bests:
    """The lowest losses of a run so far, where they were, and evaluations since the last
    improvement.

    Attributes:
      loss, loss_step: the lowest finite training loss at a logging step, and its step.
      eval_loss, eval_step: the lowest finite evaluation loss, and its step (``best_step``).
      reference: the evaluation loss of the last improvement, which the next one must beat
        by more than ``min_delta``.
      stale: evaluations since the last improvement.
      target_step: the first step whose ``eval_loss`` reached the target, if one did.
    """

    loss: float | None = None
    loss_step: int | None = None
    eval_loss: float | None = None
    eval_step: int | None = None
    reference: float | None = None
    stale: int = 0
    target_step: int | None = None

    def saw_loss(self, step: int, loss: float | None) -> None:
        """Note a logged training loss (non-finite values are never a best)."""
        if loss is not None and math.isfinite(loss) and (self.loss is None or loss < self.loss):
            self.loss, self.loss_step = float(loss), step

    def saw_eval(
        self, step: int, eval_loss: float, min_delta: float = 0.0, target: float | None = None
    ) -> None:
        """Note an evaluation: an improvement (``eval_loss < reference - min_delta``) resets
        ``stale``, anything else (a NaN included) adds one."""
        finite = math.isfinite(eval_loss)
        if finite and (self.eval_loss is None or eval_loss < self.eval_loss):
            self.eval_loss, self.eval_step = float(eval_loss), step
        if finite and (self.reference is None or eval_loss < self.reference - min_delta):
            self.reference, self.stale = float(eval_loss), 0
        else:
            self.stale += 1
        if finite and target is not None and eval_loss <= target and self.target_step is None:
            self.target_step = step

    def metrics(self) -> dict[str, float]:
        """The ``best_*`` metrics known so far, as the tracker logs them: ``best_step`` is
        the step of ``best_eval_loss``, or of ``best_loss`` before any evaluation."""
        out = {}
        if self.loss is not None:
            out["best_loss"] = self.loss
        if self.eval_loss is not None:
            out["best_eval_loss"], out["best_step"] = self.eval_loss, float(self.eval_step)
        elif self.loss is not None:
            out["best_step"] = float(self.loss_step)
        if self.target_step is not None:
            out["steps_to_target"] = float(self.target_step)
        return out

    def to_json(self) -> dict[str, Any]:
        """The counters as JSON values, for a checkpoint's record."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict[str, Any] | None, target: float | None = None) -> Bests:
        """The counters a record kept (``None``: a record from before they were kept),
        for a run whose target is ``target`` (a target reached is kept only if it is this
        run's too)."""
        names = {f.name for f in dataclasses.fields(cls)}
        bests = cls(**{k: v for k, v in (values or {}).items() if k in names})
        if target is None or bests.eval_loss is None or bests.eval_loss > target:
            bests.target_step = None
        return bests


def stop_reason(bests: Bests, patience: int | None, target: float | None) -> str | None:
    """Why the run should stop after its latest evaluation, or ``None``.

    Args:
      bests: the run's counters, fed every evaluation so far.
      patience: evaluations without improvement that end the run; ``None``: never.
      target: the ``eval_loss`` that ends the run once reached; ``None``: none.
    """
    if target is not None and bests.target_step is not None:
        return TARGET_REACHED
    if patience is not None and bests.stale >= patience:
        return EARLY_STOP
    return None


def describe_stop(reason: str, bests: Bests, patience: int | None, min_delta: float) -> str:
    """One line on why a run stopped early, for the user."""
    if reason == TARGET_REACHED:
        return f"eval_loss reached its target at step {bests.target_step}"
    return (
        f"eval_loss did not improve by more than {min_delta:g} in {patience} evaluations "
        f"(best {bests.eval_loss:.4g} at step {bests.eval_step})"
    )


def check_stopping_has_eval(config: Any, has_eval: bool) -> None:
    """Refuse early stopping without evaluation data, which it reads.

    Raises:
      ConfigError: ``early_stop_patience`` or ``target_eval_loss`` is set and there is no
        evaluation data.
    """
    from kithara_ops.errors import ConfigError

    for name in ("early_stop_patience", "target_eval_loss"):
        if getattr(config, name) is not None and not has_eval:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(
                f"{name} {getattr(config, name)!r} stops on eval_loss, but the run has no "
                f"evaluation data: pass --eval-data (eval_data=...) or drop {flag}."
            )
