"""Runs gathered into groups (one optimizer over several seeds) and whether groups differ.

Every number comes from SciPy on the values the runs logged:

- a group's **mean**, **std** (``ddof=1``) and **95% confidence interval** of the mean,
  Student's t: ``mean ± t(0.975, n-1) · std / √n`` (``scipy.stats.t.interval``); it assumes
  the runs' values are independent draws from a roughly normal distribution;
- each group against the **best** group (the best against the runner-up): when the two
  groups ran the same seeds, one run per seed, they **pair** by seed and the test is on the
  per-seed differences: the paired t-test (``scipy.stats.ttest_rel``) or, with
  ``test="wilcoxon"``, the Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, which needs
  no normality but cannot reach p < 0.05 with fewer than 6 pairs); otherwise Welch's t-test
  (``scipy.stats.ttest_ind(equal_var=False)``). The difference's 95% interval is the
  t-interval of the test's t statistic (of the paired differences, or Welch's);
- the **verdict** is ``better`` or ``worse`` when ``p < alpha`` (0.05), else
  ``not distinguishable (n=N)`` with N the pairs (or the smaller group) the test had.

A run that diverged is never a good value: it is counted in ``diverged``, left out of the
statistics, and a group with any diverged run ranks after the groups without, and is
``worse`` than a best group without one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kithara_ops.json_values import finite_or_none
from kithara_ops.tracking.compare import (
    BUDGETS,
    HIGHER_IS_BETTER,
    RunSummary,
    budget_axis,
    finish_axes,
    save_png,
)

ALPHA = 0.05
"""The significance level of the verdicts."""
TESTS = ("t", "wilcoxon")
"""Tests of paired runs: Student's paired t, or Wilcoxon's signed-rank."""


@dataclass
class GroupStats:
    """One group's statistics, and how it compares with the best group.

    Attributes:
      group: the group's name (``RunSummary.group``).
      runs: runs in the group; ``n``: those with a finite final value that did not diverge.
      diverged: runs that stopped with non-finite values.
      seeds: the seeds of the group's runs, sorted.
      mean, std, ci95: of the final values (``ci95`` is ``[low, high]``; ``std`` and
        ``ci95`` need two runs).
      best_mean, best_std, best_ci95: the same of each run's best value.
      target: the target value, when one was given; ``reached``: runs that reached it.
      steps_to_target, tokens_to_target, seconds_to_target, flops_to_target: the mean
        budget to the target over the runs that reached it.
      versus: the group compared with (the best group; for the best, the runner-up).
      difference, difference_ci95: mean of this group's values minus ``versus``'s (paired:
        the mean per-seed difference), with its 95% interval.
      test: ``paired t``, ``wilcoxon``, ``welch t``, or ``diverged`` when divergence decided.
      p_value: the test's two-sided p-value.
      verdict: ``better``, ``worse`` or ``not distinguishable (n=N)``; ``best`` for the best
        group when there is nothing to compare it with.
    """

    group: str
    runs: int
    n: int
    diverged: int
    seeds: list[int] = field(default_factory=list)
    mean: float | None = None
    std: float | None = None
    ci95: list[float] | None = None
    best_mean: float | None = None
    best_std: float | None = None
    best_ci95: list[float] | None = None
    target: float | None = None
    reached: int | None = None
    steps_to_target: float | None = None
    tokens_to_target: float | None = None
    seconds_to_target: float | None = None
    flops_to_target: float | None = None
    versus: str | None = None
    difference: float | None = None
    difference_ci95: list[float] | None = None
    test: str | None = None
    p_value: float | None = None
    verdict: str = "best"
    members: list[RunSummary] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The statistics as JSON values (no member runs, non-finite numbers as ``None``)."""
        data = asdict(self)
        del data["members"]
        return finite_or_none(data)


def diverged(run: RunSummary) -> bool:
    """Whether ``run`` stopped with non-finite values (or ended on one)."""
    return run.status.startswith("DIVERGED") or (
        run.final is not None and not math.isfinite(run.final)
    )


def spread(values: Sequence[float]) -> tuple[float | None, float | None, list[float] | None]:
    """``(mean, std, [low, high])`` of ``values``: the sample std and Student's 95% interval
    of the mean (both ``None`` for fewer than two values; all ``None`` for none)."""
    if not values:
        return None, None, None
    from scipy import stats

    data = np.asarray(values, dtype=np.float64)
    mean = float(data.mean())
    if len(data) < 2:
        return mean, None, None
    std = float(data.std(ddof=1))
    if std == 0.0:
        return mean, 0.0, [mean, mean]
    low, high = stats.t.interval(0.95, len(data) - 1, loc=mean, scale=stats.sem(data))
    return mean, std, [float(low), float(high)]


def budget_to_target(run: RunSummary, target: float, higher_is_better: bool) -> dict | None:
    """The budget at which ``run`` first reached ``target``: ``{"steps", "tokens",
    "seconds", "flops"}`` (``None`` for what the run did not log), or ``None`` if it never
    did."""
    for index, (step, value) in enumerate(run.history):
        if math.isfinite(value) and (value >= target if higher_is_better else value <= target):
            return {
                "steps": float(step),
                "tokens": float(step * run.tokens_per_step) if run.tokens_per_step else None,
                "seconds": run.seconds[index] if index < len(run.seconds) else None,
                "flops": float(step * run.flops_per_step) if run.flops_per_step else None,
            }
    return None


def group_statistics(
    summaries: Sequence[RunSummary],
    metric: str = "loss",
    *,
    test: str = "t",
    target: float | None = None,
    alpha: float = ALPHA,
) -> list[GroupStats]:
    """Gather ``summaries`` by ``group`` and compare every group with the best.

    Args:
      summaries: runs from ``compare_runs`` (their ``group``, ``seed`` and values).
      metric: the metric the summaries hold; its direction (``HIGHER_IS_BETTER``) decides
        which mean is best.
      test: ``t`` (paired t-test) or ``wilcoxon`` (signed-rank) for runs that pair by seed.
      target: a value of the metric; the budgets to reach it are reported.
      alpha: the significance level of the verdicts.

    Returns:
      One ``GroupStats`` per group, best first (see the module's notes for the ranking).
    """
    if test not in TESTS:
        raise ValueError(f"test must be one of {', '.join(TESTS)}, got {test!r}")
    higher = metric in HIGHER_IS_BETTER
    members: dict[str, list[RunSummary]] = {}
    for run in summaries:
        members.setdefault(run.group or run.label, []).append(run)
    groups = [_describe(name, runs, target, higher) for name, runs in members.items()]
    sign = -1.0 if higher else 1.0
    groups.sort(key=lambda g: (g.n == 0, g.diverged > 0, sign * (g.mean or 0.0)))
    ranked = [g for g in groups if g.n > 0]
    if len(ranked) >= 2:
        best = ranked[0]
        for group in ranked[1:]:
            _versus(group, best, test, alpha, higher)
        _versus(best, ranked[1], test, alpha, higher)
    for group in groups:
        if group.n == 0:
            group.verdict = "worse" if ranked else f"not distinguishable (n={group.n})"
    return groups


def _describe(name: str, runs: list[RunSummary], target: float | None, higher: bool) -> GroupStats:
    good = [run for run in runs if run.final is not None and not diverged(run)]
    stats = GroupStats(
        group=name,
        runs=len(runs),
        n=len(good),
        diverged=sum(diverged(run) for run in runs),
        seeds=sorted(run.seed for run in runs if run.seed is not None),
        members=good,
    )
    stats.mean, stats.std, stats.ci95 = spread([run.final for run in good])
    bests = [run.best for run in good if run.best is not None and math.isfinite(run.best)]
    stats.best_mean, stats.best_std, stats.best_ci95 = spread(bests)
    if target is not None:
        reached = [b for run in good if (b := budget_to_target(run, target, higher)) is not None]
        stats.target, stats.reached = target, len(reached)
        for axis in BUDGETS:
            values = [b[axis] for b in reached if b[axis] is not None]
            setattr(stats, f"{axis}_to_target", float(np.mean(values)) if values else None)
    return stats


def _pairs(a: GroupStats, b: GroupStats) -> list[tuple[float, float]] | None:
    """The two groups' final values paired by seed, when every run of each has a seed the
    other group ran once too; else ``None``."""
    by_seed_a = {run.seed: run.final for run in a.members}
    by_seed_b = {run.seed: run.final for run in b.members}
    if None in by_seed_a or None in by_seed_b:
        return None
    if len(by_seed_a) != len(a.members) or len(by_seed_b) != len(b.members):
        return None  # a seed run twice: no one-to-one pairing
    if set(by_seed_a) != set(by_seed_b):
        return None
    return [(by_seed_a[seed], by_seed_b[seed]) for seed in sorted(by_seed_a)]


def _versus(group: GroupStats, other: GroupStats, test: str, alpha: float, higher: bool) -> None:
    """Fill ``group``'s comparison with ``other``."""
    with warnings.catch_warnings():
        # Nearly constant differences make SciPy warn of lost precision; the p-value it
        # returns (near 0) is still the answer, and the warning would only be noise.
        warnings.simplefilter("ignore", RuntimeWarning)
        _test(group, other, test, alpha, higher)


def _test(group: GroupStats, other: GroupStats, test: str, alpha: float, higher: bool) -> None:
    from scipy import stats

    group.versus = other.group
    if group.diverged and not other.diverged:
        group.test, group.verdict = "diverged", "worse"
        return
    if other.diverged and not group.diverged:
        group.test, group.verdict = "diverged", "better"
        return
    pairs = _pairs(group, other)
    if pairs is not None:
        mine, theirs = (np.array(side, dtype=np.float64) for side in zip(*pairs))
        count = len(pairs)
    else:
        mine = np.array([run.final for run in group.members], dtype=np.float64)
        theirs = np.array([run.final for run in other.members], dtype=np.float64)
        count = min(len(mine), len(theirs))
    group.difference = float(mine.mean() - theirs.mean())
    group.verdict = f"not distinguishable (n={count})"
    if count < 2:
        return
    if pairs is not None:
        differences = mine - theirs
        group.test = "wilcoxon" if test == "wilcoxon" else "paired t"
        if not np.any(differences):  # identical on every seed: no difference to test
            group.p_value, group.difference_ci95 = 1.0, [0.0, 0.0]
            return
        result = stats.ttest_rel(mine, theirs)
        if test == "wilcoxon":
            group.p_value = float(stats.wilcoxon(mine, theirs).pvalue)
        else:
            group.p_value = float(result.pvalue)
    else:
        group.test = "welch t"
        result = stats.ttest_ind(mine, theirs, equal_var=False)
        group.p_value = float(result.pvalue)
    interval = result.confidence_interval(0.95)
    group.difference_ci95 = [float(interval.low), float(interval.high)]
    if group.p_value is not None and group.p_value < alpha:
        ahead = group.difference > 0 if higher else group.difference < 0
        group.verdict = "better" if ahead else "worse"


def group_curve(
    group: GroupStats, axis: str = "steps"
) -> tuple[list[float], list[float], list[float]] | None:
    """The group's mean curve on budget ``axis``: ``(x, mean, std)`` at the steps every
    member logged (x averaged over the members, which differ on the ``seconds`` axis), or
    ``None`` when no step is common or a member lacks the axis."""
    series = []
    for run in group.members:
        xs = budget_axis(run, axis)
        if xs is None or not run.history:
            return None
        series.append({step: (x, value) for x, (step, value) in zip(xs, run.history)})
    if not series:
        return None
    common = sorted(set.intersection(*(set(points) for points in series)))
    if not common:
        return None
    xs, means, stds = [], [], []
    for step in common:
        points = np.array([s[step] for s in series], dtype=np.float64)
        xs.append(float(points[:, 0].mean()))
        means.append(float(points[:, 1].mean()))
        stds.append(float(points[:, 1].std(ddof=1)) if len(points) > 1 else 0.0)
    return xs, means, stds


def to_csv(groups: Sequence[GroupStats]) -> str:
    """The groups as CSV: a header of ``GroupStats`` field names (each ``[low, high]``
    interval as ``NAME_low`` and ``NAME_high``, seeds joined by ``;``), a row per group."""
    import csv
    import io

    rows = []
    for group in groups:
        row = {}
        for key, value in group.to_dict().items():
            if key.endswith("ci95"):
                row[f"{key}_low"], row[f"{key}_high"] = value if value else ("", "")
            elif key == "seeds":
                row[key] = ";".join(str(seed) for seed in value)
            else:
                row[key] = "" if value is None else value
        rows.append(row)
    out = io.StringIO()
    fields = list(rows[0]) if rows else []
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def groups_figure(groups: Sequence[GroupStats], metric: str, x: str = "steps") -> Any:
    """A chart of one mean curve per group, with a band of ± one std over its runs."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 5), layout="constrained")
    axes = figure.add_subplot()
    for group in groups:
        curve = group_curve(group, x)
        if curve is None:
            continue
        xs, means, stds = (np.asarray(part) for part in curve)
        (line,) = axes.plot(xs, means, label=f"{group.group} (n={group.n})", linewidth=1.5)
        axes.fill_between(xs, means - stds, means + stds, color=line.get_color(), alpha=0.2)
    return finish_axes(figure, axes, metric, x, ": mean ± std")


def plot_groups(groups: Sequence[GroupStats], metric: str, output: Any, x: str = "steps") -> Any:
    """Write ``groups_figure`` as a PNG to ``output`` (parents created); returns the path."""
    return save_png(groups_figure(groups, metric, x), output)
