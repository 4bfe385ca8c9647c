"""Statistics of groups of runs: every number against SciPy's, on values built here."""

import csv
import io
import math

import numpy as np
import pytest
from scipy import stats

from kithara_ops.tracking.compare import RunSummary, budget_axis
from kithara_ops.tracking.groups import budget_to_target, group_curve, group_statistics, to_csv


def run(group, seed, final, *, best=None, status="FINISHED", history=None, times=None):
    history = history or [(10, final + 1.0), (20, final)]
    return RunSummary(
        run_id=f"{group}-{seed}", run_name=f"{group} seed {seed}", label=group, status=status,
        final=final, best=final if best is None else best, group=group, seed=seed,
        tokens_per_step=256, flops_per_step=1e9, history=history,
        seconds=times or [1.0 * i for i in range(1, len(history) + 1)],
    )  # fmt: skip


def by_name(groups):
    return {g.group: g for g in groups}


def test_each_group_has_scipys_mean_std_and_interval():
    values = {"a": [2.37, 1.98, 2.48], "b": [2.33, 1.94, 2.43, 2.1]}
    runs = [run(g, s, v) for g, vs in values.items() for s, v in enumerate(vs)]
    groups = by_name(group_statistics(runs))
    for name, vs in values.items():
        g = groups[name]
        assert (g.n, g.runs, g.diverged, g.seeds) == (len(vs), len(vs), 0, list(range(len(vs))))
        assert g.mean == pytest.approx(np.mean(vs))
        assert g.std == pytest.approx(np.std(vs, ddof=1))
        low, high = stats.t.interval(0.95, len(vs) - 1, loc=np.mean(vs), scale=stats.sem(vs))
        assert g.ci95 == pytest.approx([low, high])


def test_paired_seeds_are_tested_on_their_differences():
    a, b = [2.373, 1.979, 2.477], [2.333, 1.944, 2.431]  # b wins by 0.03-0.05 on every seed
    runs = [run("a", s, v) for s, v in enumerate(a)] + [run("b", s, v) for s, v in enumerate(b)]
    best, other = group_statistics(runs)
    assert (best.group, other.group) == ("b", "a")  # ranked by mean, lower first
    expected = stats.ttest_rel(a, b)
    assert other.test == "paired t" and other.versus == "b"
    assert other.p_value == pytest.approx(expected.pvalue)
    assert other.difference == pytest.approx(np.mean(np.subtract(a, b)))
    interval = expected.confidence_interval(0.95)
    assert other.difference_ci95 == pytest.approx([interval.low, interval.high])
    assert other.p_value < 0.05 and other.verdict == "worse"
    # The best is compared with the runner-up, the other way round.
    assert best.versus == "a" and best.verdict == "better"
    assert best.p_value == pytest.approx(stats.ttest_rel(b, a).pvalue)
    # Unpaired, the same numbers are lost in the spread across seeds.
    shuffled = [run("a", s, v) for s, v in enumerate(a)] + [
        run("b", s + 10, v) for s, v in enumerate(b)
    ]
    _, unpaired = group_statistics(shuffled)
    assert unpaired.test == "welch t"
    assert unpaired.p_value == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert unpaired.verdict == "not distinguishable (n=3)"


def test_wilcoxon_is_scipys_and_needs_more_than_three_pairs():
    a, b = [3.0, 2.9, 3.1, 3.2, 2.8, 3.05], [2.0, 2.1, 2.05, 2.2, 1.9, 2.0]
    runs = [run("a", s, v) for s, v in enumerate(a)] + [run("b", s, v) for s, v in enumerate(b)]
    _, other = group_statistics(runs, test="wilcoxon")
    assert other.test == "wilcoxon"
    assert other.p_value == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert other.verdict == "worse"
    three = [r for r in runs if r.seed < 3]
    _, few = group_statistics(three, test="wilcoxon")
    assert few.p_value == pytest.approx(stats.wilcoxon(a[:3], b[:3]).pvalue) and few.p_value > 0.05
    assert few.verdict == "not distinguishable (n=3)"


def test_a_seed_that_ranks_the_other_way_is_not_distinguishable():
    # b is better on average, but seed 2 ranks a first.
    a, b = [2.40, 2.20, 2.00], [2.10, 1.90, 2.05]
    runs = [run("a", s, v) for s, v in enumerate(a)] + [run("b", s, v) for s, v in enumerate(b)]
    best, other = group_statistics(runs)
    assert best.group == "b" and best.mean < other.mean
    assert other.p_value == pytest.approx(stats.ttest_rel(a, b).pvalue) and other.p_value > 0.05
    assert other.verdict == best.verdict == "not distinguishable (n=3)"


def test_identical_runs_are_not_distinguishable_with_p_one():
    runs = [run(g, s, v) for g in ("x", "y") for s, v in enumerate([2.0, 2.5, 2.2])]
    best, other = group_statistics(runs)
    assert other.p_value == 1.0 and other.difference == 0.0
    assert other.difference_ci95 == [0.0, 0.0]
    assert other.verdict == best.verdict == "not distinguishable (n=3)"


def test_a_diverged_run_is_never_a_good_value():
    runs = [run("steady", s, 2.5) for s in range(3)]
    runs += [run("wild", 0, 1.0), run("wild", 1, 1.1)]
    runs += [run("wild", 2, math.nan, status="DIVERGED@7")]
    steady, wild = group_statistics(runs)
    assert steady.group == "steady"  # a lower mean does not outrank a divergence
    assert (wild.n, wild.runs, wild.diverged) == (2, 3, 1)
    assert wild.mean == pytest.approx(1.05)
    assert (wild.test, wild.verdict) == ("diverged", "worse")
    assert (steady.test, steady.verdict) == ("diverged", "better")
    assert wild.to_dict()["diverged"] == 1


def test_budgets_to_a_target_on_every_axis():
    history = [(10, 3.0), (20, 2.4), (30, 2.1), (40, 1.9)]
    times = [5.0, 9.0, 14.0, 18.0]
    first = run("a", 0, 1.9, history=history, times=times)
    assert budget_to_target(first, 2.2, higher_is_better=False) == {
        "steps": 30.0, "tokens": 30.0 * 256, "seconds": 14.0, "flops": 30.0 * 1e9,
    }  # fmt: skip
    assert budget_to_target(first, 1.0, higher_is_better=False) is None
    assert budget_axis(first, "tokens") == [s * 256.0 for s, _ in history]
    assert budget_axis(first, "seconds") == times
    late = run("a", 1, 2.0, history=[(10, 3.0), (20, 2.5), (30, 2.3), (40, 2.0)], times=times)
    (group,) = group_statistics([first, late], target=2.2)
    assert group.reached == 2 and group.steps_to_target == 35.0  # 30 and 40
    assert group.seconds_to_target == pytest.approx((14.0 + 18.0) / 2)
    xs, means, stds = group_curve(group, "steps")
    assert xs == [10.0, 20.0, 30.0, 40.0]
    assert means == pytest.approx([3.0, 2.45, 2.2, 1.95])
    assert stds[1] == pytest.approx(np.std([2.4, 2.5], ddof=1))


def test_csv_and_json_carry_every_field_under_documented_names():
    runs = [run(g, s, v + s / 10) for g, v in (("a", 2.0), ("b", 3.0)) for s in range(3)]
    groups = group_statistics(runs, target=2.5)
    rows = list(csv.DictReader(io.StringIO(to_csv(groups))))
    assert [row["group"] for row in rows] == ["a", "b"]
    for name in ("n", "mean", "ci95_low", "ci95_high", "p_value", "verdict", "steps_to_target"):
        assert name in rows[0], name
    assert float(rows[1]["mean"]) == pytest.approx(3.1)
    assert rows[1]["seeds"] == "0;1;2"
    data = groups[1].to_dict()
    assert data["ci95"] == pytest.approx(groups[1].ci95) and "members" not in data
    assert data["p_value"] == pytest.approx(
        stats.ttest_rel([3.0, 3.1, 3.2], [2.0, 2.1, 2.2]).pvalue
    )
