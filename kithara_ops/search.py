"""Tuning before comparing: each optimizer searched on an equal budget, then confirmed.

A search fills each optimizer template's ``$placeholders`` (``optim.search_space``) from a
grid or from an Optuna study, and trains every trial as an MLflow child run of the sweep's
parent (tag ``kithara_ops.stage=search``, params ``search.NAME``). The objective is the
trial's final ``eval_loss``, on held-out data, never the training loss. Then each
optimizer's best configuration is trained once per confirmation seed (tag
``kithara_ops.stage=confirm``, group the optimizer) so that ``compare --group`` compares
tuned optimizers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from kithara_ops.callbacks import Callback
from kithara_ops.errors import ConfigError, Diverged, first_line
from kithara_ops.optim.search_space import SearchDesign, fill, placeholders
from kithara_ops.stopping import PRUNED

STAGE_TAG = "kithara_ops.stage"
"""Tag saying which stage of a search a child run belongs to: ``search`` or ``confirm``."""
SEARCH, CONFIRM = "search", "confirm"


@dataclasses.dataclass
class Trial:
    """One configuration of one optimizer, and how it did.

    Attributes:
      group: the optimizer it tunes (the sweep's group of its template).
      number: its number among that optimizer's trials, from 0.
      values: ``placeholder -> value``.
      spec: the template with the values filled in.
      state: ``complete``, ``pruned``, ``failed`` (diverged or raised) or ``running``.
      objective: its final ``eval_loss`` when complete.
      run_id: its MLflow run.
      pruned_at_step: the evaluation step its pruner stopped it at.
    """

    group: str
    number: int
    values: dict[str, Any]
    spec: str
    state: str = "running"
    objective: float | None = None
    run_id: str | None = None
    pruned_at_step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """As JSON values (a non-finite objective as ``None``)."""
        out = dataclasses.asdict(self)
        finite = self.objective is not None and math.isfinite(self.objective)
        out["objective"] = self.objective if finite else None
        return out


class TrialPruning(Callback):
    """Reports each ``eval_loss`` to an Optuna trial and asks the run to stop once the
    study's pruner judges it (``should_prune``): the run ends with ``stop_reason`` ``pruned``."""

    def __init__(self, trial: Any):
        self.trial, self.pruned_at = trial, None

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.trial.report(metrics["eval_loss"], step)
        if self.pruned_at is None and self.trial.should_prune():
            self.pruned_at = step

    def stop_request(self) -> str | None:
        return PRUNED if self.pruned_at is not None else None


def template_groups(templates: Sequence[str], labels: Sequence[str]) -> list[str]:
    """Each template's group: its optimizer's label without the learning rate
    (``optax:adamw``), or the template itself where two templates share one."""
    names = [label.split(" ", 1)[0] for label in labels]
    return [n if names.count(n) == 1 else t for t, n in zip(templates, names)]


def check_design(config: Any, design: SearchDesign) -> None:
    """Refuse a search that cannot choose: one without evaluation data."""
    if design.searched and config.eval_data is None:
        raise ConfigError(
            "A search chooses by eval_loss on held-out data, and there is none: pass "
            "--eval-data (and --eval-every to let a pruner judge trials as they train)."
        )


def train_trial(
    config: Any, trial: Trial, *, parent_id: str, experiment: str, seed: int, stage: str,
    name: str, callbacks: Sequence[Callback] = (), echo: Callable[[str], None] = print,
) -> Trial:  # fmt: skip
    """Train ``trial`` in this process as a child run of ``parent_id``; it comes back with
    its state, objective and run. A failure is told in one line and is the trial's state;
    a stop signal (no ``Exception``) ends the whole search."""
    import keras

    from kithara_ops.build import build_trainer

    group = trial.group if stage == CONFIRM else f"{trial.group} ({SEARCH})"
    run = config.replace(optimizer=trial.spec, seed=seed, group=group, parent_run_id=parent_id,
                         experiment=experiment, run_name=name)  # fmt: skip
    try:
        result = build_trainer(run, callbacks).train()
        trial.run_id, trial.objective = result.run_id, result.eval_loss
        finite = result.eval_loss is not None and math.isfinite(result.eval_loss)
        pruned = result.stop_reason == PRUNED
        trial.state = "pruned" if pruned else "complete" if finite else "failed"
        trial.pruned_at_step = result.step if pruned else None
    except Diverged as err:
        trial.state = "failed"
        echo(f"{name}: diverged ({first_line(err)})")
    except Exception as err:
        trial.state = "failed"
        echo(f"{name} ({trial.spec!r}) failed: {first_line(err)}")
    finally:
        keras.backend.clear_session()  # the next trial builds its model from a clean slate
    if trial.run_id:
        _label_run(config.tracking_uri, trial, stage)
    return trial


def _label_run(tracking_uri: str | None, trial: Trial, stage: str) -> None:
    """The trial's values as ``search.NAME`` params and its stage and number as tags."""
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunTag

    params = [Param(f"search.{k}", repr(v)) for k, v in trial.values.items()]
    tags = [RunTag(STAGE_TAG, stage), RunTag("kithara_ops.trial", str(trial.number))]
    MlflowClient(tracking_uri).log_batch(trial.run_id, params=params, tags=tags)


def grid_trials(design: SearchDesign, templates: Sequence[str], groups: Sequence[str]):
    """Every grid point of every template, in order: ``Trial`` objects not yet trained."""
    for template, group in zip(templates, groups):
        for number, values in enumerate(design.grid_points(template)):
            yield Trial(group, number, values, fill(template, values))


def best_trials(trials: Sequence[Trial]) -> dict[str, Trial]:
    """Each group's complete trial with the lowest objective (groups with none are left out)."""
    best: dict[str, Trial] = {}
    for trial in trials:
        if trial.state != "complete":
            continue
        if trial.group not in best or trial.objective < best[trial.group].objective:
            best[trial.group] = trial
    return best


def confirm(
    config: Any, best: dict[str, Trial], seeds: Sequence[int], *, parent_id: str,
    experiment: str, echo: Callable[[str], None] = print,
) -> list[Trial]:  # fmt: skip
    """Train each group's best configuration once per seed, named ``GROUP seed N``."""
    runs = []
    for group, chosen in best.items():
        for seed in seeds:
            again = Trial(group, chosen.number, dict(chosen.values), chosen.spec)
            runs.append(train_trial(config, again, parent_id=parent_id, experiment=experiment,
                                    seed=seed, stage=CONFIRM, name=f"{group} seed {seed}",
                                    echo=echo))  # fmt: skip
    return runs


def placeholder_names(templates: Sequence[str]) -> list[str]:
    """Every placeholder of the templates, each once."""
    return list(dict.fromkeys(n for t in templates for n in placeholders(t)))


def decide_lr_find(config: Any, design: SearchDesign, groups: Sequence[str],
                   echo: Callable[[str], None] = print) -> SearchDesign:  # fmt: skip
    """``design`` with each ``lr-find`` space decided per template: a range test of the
    template (its other placeholders at a value inside their space) suggests ``s``, and the
    space becomes ``loguniform(s / 10, s * 10)``."""
    from kithara_ops.lr_find import lr_find
    from kithara_ops.optim.search_space import LR_FIND, Distribution

    decided = {}
    for template, group in zip(design.templates, groups):
        names = [n for n in placeholders(template) if design.space_for(template)[n].kind == LR_FIND]
        if not names:
            continue
        if len(names) > 1:
            raise ConfigError(f"{template!r}: one placeholder per spec can be lr-find.")
        others = {n: v for n, v in design.representative(template).items() if n != names[0]}
        spec = fill(template, others).replace(f"${names[0]}", "$lr")
        test = lr_find(config.replace(optimizer=spec))
        rate = test.suggested_learning_rate
        decided[template] = {names[0]: Distribution("loguniform", rate / 10, rate * 10)}
        echo(
            f"{group}: lr-find suggests {rate:.3g}, so ${names[0]} ~ {decided[template][names[0]]}"
        )
    return dataclasses.replace(design, decided=decided)
