"""How much each optimizer's result depends on what a search tuned, from its trials.

Each search trial (tag ``kithara_ops.stage=search``) carries its values as ``search.NAME``
params and its final ``eval_loss`` as a metric. Per optimizer and hyperparameter, the
points ``(value, eval_loss)`` show how sharp the optimum is: a flat curve forgives a
mistuned value, a sharp one does not. Pruned trials are drawn apart, at the ``eval_loss``
of their last evaluation.
"""

from __future__ import annotations

import ast
import dataclasses
import math
from collections.abc import Iterable
from typing import Any

SEARCH_PARAM = "search."


@dataclasses.dataclass
class Point:
    """One trial's value of one hyperparameter, and how the trial ended."""

    value: Any
    eval_loss: float | None
    pruned: bool


def sensitivity(runs: Iterable[Any]) -> dict[str, dict[str, list[Point]]]:
    """``group -> hyperparameter -> points``, from MLflow runs of a search's stage."""
    out: dict[str, dict[str, list[Point]]] = {}
    for run in runs:
        if run.data.tags.get("kithara_ops.stage") != "search":
            continue
        group = run.data.params.get("group", "").removesuffix(" (search)")
        loss = run.data.metrics.get("eval_loss")
        loss = loss if loss is not None and math.isfinite(loss) else None
        for key, text in run.data.params.items():
            if key.startswith(SEARCH_PARAM):
                value = ast.literal_eval(text)  # written by repr() of a literal
                point = Point(value, loss, run.info.status == "KILLED")
                out.setdefault(group, {}).setdefault(key[len(SEARCH_PARAM) :], []).append(point)
    for names in out.values():
        for points in names.values():
            points.sort(key=lambda p: (str(type(p.value)), p.value))
    return out


def _numeric(points: list[Point]) -> bool:
    return all(isinstance(p.value, (int, float)) and not isinstance(p.value, bool) for p in points)


def sensitivity_figure(found: dict[str, dict[str, list[Point]]]) -> Any:
    """One panel per hyperparameter: final ``eval_loss`` against its value, a line per
    optimizer through its complete trials, pruned trials as crosses; log x where the
    values are positive and span more than a decade."""
    from matplotlib.figure import Figure

    names = sorted({n for by_name in found.values() for n in by_name})
    figure = Figure(figsize=(5.5 * len(names), 4.2))
    for i, name in enumerate(names):
        axes = figure.add_subplot(1, len(names), i + 1)
        for group, by_name in sorted(found.items()):
            points = by_name.get(name, [])
            done = [p for p in points if not p.pruned and p.eval_loss is not None]
            xs = [p.value if _numeric(points) else str(p.value) for p in done]
            (line,) = axes.plot(xs, [p.eval_loss for p in done], marker="o", label=group)
            cut = [p for p in points if p.pruned and p.eval_loss is not None]
            axes.scatter([p.value if _numeric(points) else str(p.value) for p in cut],
                         [p.eval_loss for p in cut], marker="x", color=line.get_color())  # fmt: skip
        points = [p for by_name in found.values() for p in by_name.get(name, [])]
        values = [p.value for p in points] if _numeric(points) else []
        if values and min(values) > 0 and max(values) / min(values) > 10:
            axes.set_xscale("log")
        axes.set_xlabel(name)
        axes.set_ylabel("final eval_loss (x: pruned)")
        axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def sensitivity_rows(found: dict[str, dict[str, list[Point]]]) -> list[dict[str, Any]]:
    """Per optimizer and hyperparameter: trials, the best value and its ``eval_loss``, and
    the spread of ``eval_loss`` over complete trials (worst minus best)."""
    rows = []
    for group, by_name in sorted(found.items()):
        for name, points in sorted(by_name.items()):
            done = [p for p in points if not p.pruned and p.eval_loss is not None]
            best = min(done, key=lambda p: p.eval_loss) if done else None
            rows.append({
                "group": group, "hyperparameter": name, "trials": len(points),
                "pruned": sum(p.pruned for p in points),
                "best_value": best.value if best else None,
                "best_eval_loss": best.eval_loss if best else None,
                "spread": max(p.eval_loss for p in done) - best.eval_loss if best else None,
            })  # fmt: skip
    return rows
