"""An Optuna study per optimizer, shared by every ``sweep`` process that names its storage.

Several processes, on one machine or many, fill the same studies through one Optuna RDB
storage (SQLite, PostgreSQL). Exactly ``trials`` trials of each optimizer are trained, none
twice: the storage numbers trials atomically, and a process whose ``ask`` got a number past
the budget marks that trial ``FAIL`` (user attr ``surplus``) without training it. The first
process to create the lead study creates the MLflow parent run and records its id there;
the others read it. The process that finds every trial done first (a claim on the lead
study, atomic too) confirms the best configurations and ends the parent run.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from typing import Any

from kithara_ops.errors import ConfigError, first_line
from kithara_ops.search import Trial

PARENT_ATTR = "mlflow_parent_run_id"
_WAIT_FOR_PARENT_S = 120.0


def require_optuna() -> Any:
    """The ``optuna`` module, or a one-line error naming the extra that installs it."""
    try:
        import optuna
    except ImportError:
        raise ConfigError(
            "--trials samples with Optuna, which is not installed: pip install "
            "'kithara-ops[search]' (a --grid needs nothing more)."
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def default_study_name(design: dict[str, Any]) -> str:
    """``sweep-<hash>`` of the design as asked: the same command names the same study. The
    spaces each process's lr-find decided (``sweep.space.NAME.i``) are left out, since
    processes on different hardware may decide them a little differently."""
    asked = {k: v for k, v in design.items() if not re.fullmatch(r"sweep\.space\.\w+\.\d+", k)}
    text = json.dumps(asked, sort_keys=True, default=str)
    return "sweep-" + hashlib.sha256(text.encode()).hexdigest()[:10]


def make_pruner(kind: str | None, steps: int, eval_every: int | None) -> Any:
    """``median``: a trial stops when its ``eval_loss`` at an evaluation step is worse than
    the median of earlier trials' at that step (after 2 trials, Optuna's ``MedianPruner``);
    ``hyperband``: Optuna's ``HyperbandPruner`` from ``eval_every`` to ``steps`` steps,
    reduction factor 3. ``None``: no pruning (Optuna's ``NopPruner``)."""
    optuna = require_optuna()
    if kind is None:
        return optuna.pruners.NopPruner()
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    return optuna.pruners.HyperbandPruner(
        min_resource=eval_every or 1, max_resource=steps, reduction_factor=3
    )


def _open_storage(optuna: Any, url: str) -> Any:
    """An RDB storage, its tables created once even when processes open it at the same time.

    Two processes that find no tables both create them, and the slower one's insert of the
    schema version fails; by then the tables exist, and opening again succeeds. SQLite waits
    up to 60 s for a lock instead of 5, for processes that write trials at the same moment.
    """
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except Exception as err:  # sqlalchemy's errors, or Optuna's on a bad URL
            racing = type(err).__name__ in ("IntegrityError", "OperationalError")
            if attempt == 4 or not racing:
                raise ConfigError(
                    f"--study-storage {url!r} cannot be opened ({first_line(err)}): pass an "
                    "Optuna storage URL such as sqlite:///study.db or postgresql://..."
                ) from None
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


class SharedStudy:
    """The studies of one search: a lead study and one per optimizer group.

    Args:
      storage: an Optuna storage URL, or ``None`` for memory (this process alone).
      name: the search's study name; an optimizer's study is ``NAME/GROUP``.
      trials: the trials each optimizer gets.
      pruner: from ``make_pruner``.
      seed: seeds the TPE sampler in memory; shared storages sample unseeded, so that two
        processes never propose the same values in the same order.
    """

    def __init__(self, storage: str | None, name: str, trials: int, pruner: Any, seed: int):
        optuna = require_optuna()
        self.optuna, self.name, self.trials, self.pruner = optuna, name, trials, pruner
        self.storage = (
            _open_storage(optuna, storage) if storage else optuna.storages.InMemoryStorage()
        )
        self.seed = None if storage else seed
        self._studies: dict[str, Any] = {}

    def parent(self, create: Any) -> tuple[str, bool]:
        """The MLflow parent run's id, and whether this process created it (by calling
        ``create()``) because it created the lead study."""
        optuna = self.optuna
        try:
            lead = optuna.create_study(study_name=self.name, storage=self.storage)
        except optuna.exceptions.DuplicatedStudyError:
            lead = optuna.load_study(study_name=self.name, storage=self.storage)
        else:
            parent = create()
            lead.set_user_attr(PARENT_ATTR, parent)
            return parent, True
        deadline = time.monotonic() + _WAIT_FOR_PARENT_S
        while (parent := lead.user_attrs.get(PARENT_ATTR)) is None:
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"Study {self.name!r} has no MLflow parent run after "
                    f"{_WAIT_FOR_PARENT_S:.0f} s: its first process failed; use a new --study-name."
                )
            time.sleep(0.5)
            lead = optuna.load_study(study_name=self.name, storage=self.storage)
        return parent, False

    def study(self, group: str) -> Any:
        """The Optuna study of one optimizer group (created on first use, by any process)."""
        if group not in self._studies:
            self._studies[group] = self.optuna.create_study(
                study_name=f"{self.name}/{group}", storage=self.storage, load_if_exists=True,
                direction="minimize", pruner=self.pruner,
                sampler=self.optuna.samplers.TPESampler(seed=self.seed),
            )  # fmt: skip
        return self._studies[group]

    def claim(self, group: str) -> Any | None:
        """The next trial of ``group`` for this process to train, or ``None`` when the
        group's budget is taken."""
        study = self.study(group)
        if self._counted(study) >= self.trials:
            return None
        trial = study.ask()
        if trial.number >= self.trials:  # another process took the last one first
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=self.optuna.trial.TrialState.FAIL)
            return None
        return trial

    def record(self, optuna_trial: Any, trial: Trial) -> None:
        """Tell the study how ``trial`` ended, with its MLflow run id."""
        states = self.optuna.trial.TrialState
        if trial.run_id:
            optuna_trial.set_user_attr("mlflow_run_id", trial.run_id)
        if trial.state == "complete":
            optuna_trial.study.tell(optuna_trial, trial.objective)
        elif trial.state == "pruned":
            optuna_trial.set_user_attr("pruned_at_step", trial.pruned_at_step)
            optuna_trial.study.tell(optuna_trial, state=states.PRUNED)
        else:
            optuna_trial.study.tell(optuna_trial, state=states.FAIL)

    def _counted(self, study: Any) -> int:
        return sum(1 for t in study.get_trials(deepcopy=False) if t.number < self.trials)

    def done(self, groups: list[str]) -> bool:
        """Whether every trial of every group has ended (in any process)."""
        for group in groups:
            ended = [t for t in self.study(group).get_trials(deepcopy=False)
                     if t.number < self.trials and t.state.is_finished()]  # fmt: skip
            if len(ended) < self.trials:
                return False
        return True

    def claim_finish(self) -> bool:
        """Whether this process is the one to confirm and end the search (the first to ask)."""
        lead = self.optuna.load_study(study_name=self.name, storage=self.storage)
        token = lead.ask()
        lead.tell(token, state=self.optuna.trial.TrialState.FAIL)
        return token.number == 0

    def results(self, groups: list[str]) -> list[Trial]:
        """Every trial of the search, from the storage: whichever process trained it."""
        out = []
        for group in groups:
            for t in self.study(group).get_trials(deepcopy=False):
                if t.number >= self.trials:
                    continue
                state = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}.get(
                    t.state.name, "running"
                )
                out.append(Trial(group, t.number, dict(t.params), t.user_attrs.get("spec", ""),
                                 state, t.value, t.user_attrs.get("mlflow_run_id"),
                                 t.user_attrs.get("pruned_at_step")))  # fmt: skip
        return out
