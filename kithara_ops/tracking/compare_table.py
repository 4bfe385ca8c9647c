"""The comparison table: one row per run, numbers never cut, least important columns
left out first when the terminal is narrow."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kithara_ops.tracking.compare import HIGHER_IS_BETTER, run_names
from kithara_ops.tracking.table import GAP, Column, fit_columns, table_width

if TYPE_CHECKING:
    from rich.console import Console as RichConsole
    from rich.table import Table

    from kithara_ops.tracking.compare import RunSummary


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def table_columns(summaries: Sequence[RunSummary]) -> list[Column]:
    """The comparison table's columns, one cell per run, most important first to stay.

    ``mfu`` (shown where a run logged it) and ``flop/s`` go first when the terminal is
    narrow, then ``optimizer``, ``tok/s`` (the median) and ``lr``; rank, run (its name, see
    ``run_names``), status, steps and the metric's values always stay.
    """
    return [
        Column("#", [str(rank) for rank in range(1, len(summaries) + 1)], number=True),
        Column("run", run_names(summaries)),
        Column("optimizer", [s.optimizer or "-" for s in summaries], drop_rank=3),
        Column("lr", [s.learning_rate or "-" for s in summaries], drop_rank=1),
        Column("status", [s.status for s in summaries]),
        Column("steps", ["-" if s.steps is None else str(s.steps) for s in summaries], number=True),
        Column("final", [_number(s.final) for s in summaries], number=True),
        Column("best", [_number(s.best) for s in summaries], number=True),
        Column(
            "tok/s",
            [
                "-" if s.tokens_per_second is None else f"{s.tokens_per_second:,.0f}"
                for s in summaries
            ],
            number=True,
            drop_rank=2,
        ),
        Column("flop/s", [_si(s.flops_per_second) for s in summaries], number=True, drop_rank=4),
    ] + (
        [Column("mfu", [_percent(s.mfu) for s in summaries], number=True, drop_rank=5)]
        if any(s.mfu is not None for s in summaries)
        else []
    )


def _si(value: float | None) -> str:
    """``value`` in 3 significant digits with an SI prefix (``22.8G``), or ``-``."""
    if value is None or not math.isfinite(value):
        return "-"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{prefix}"
    return f"{value:.3g}"


def _percent(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def format_table(summaries: Sequence[RunSummary], metric: str, width: int | None = None) -> Table:
    """Return a ``rich`` table with one row per run, in the order given.

    Numbers are never cut: in ``width`` columns, text cells wrap between words and, if that is
    not enough, the least important columns are left out and named in the caption.

    Args:
        summaries: The runs, as returned by :func:`compare_runs`.
        metric: The compared metric, named in the title (``final`` and ``best`` are its values).
        width: The terminal's width; ``None`` for one line per run, however wide.

    Returns:
        The table, ready for ``rich.console.Console.print``.
    """
    from rich.table import Table
    from rich.text import Text

    columns = table_columns(summaries)
    kept, widths = fit_columns(columns, width)
    better = "higher" if metric in HIGHER_IS_BETTER else "lower"
    left_out = [column.header for column in columns if column not in kept]
    caption = f"left out to fit: {', '.join(left_out)} (--json shows all)" if left_out else None
    table = Table(
        title=Text(f"{metric} ({better} is better)"),
        title_justify="left",
        caption=caption,
        caption_justify="left",
        box=None,
        padding=(0, GAP // 2),
        pad_edge=False,
        collapse_padding=False,
    )
    for column, column_width in zip(kept, widths):
        table.add_column(
            column.header,
            justify="right" if column.number else "left",
            width=column_width,
            no_wrap=column.number,
            overflow="fold",  # a word longer than its cell wraps; it is never cut
        )
    for row in range(len(summaries)):
        table.add_row(*(Text(column.cells[row]) for column in kept))
    return table


def print_table(
    summaries: Sequence[RunSummary], metric: str, console: RichConsole | None = None
) -> None:
    """Print the comparison table so that no value is cut.

    In a terminal the table fits the terminal's width (see :func:`format_table`); piped to a
    file or another program, each run stays on one line, however long.
    """
    from rich.console import Console

    console = console or Console()
    width = console.width if console.is_terminal else None
    _, widths = fit_columns(table_columns(summaries), width)
    # Rich would squeeze a table wider than the console, cutting numbers: widen the console
    # instead (a terminal then wraps the long rows; a file has no width to respect).
    narrow = console.width
    console.width = max(narrow, table_width(widths))
    try:
        console.print(format_table(summaries, metric, width=width))
    finally:
        console.width = narrow


def _interval(values: list[float] | None) -> str:
    return "-" if not values else f"[{values[0]:.4g}, {values[1]:.4g}]"


def print_group_table(
    groups: Sequence[Any], metric: str, console: RichConsole | None = None
) -> None:
    """Print one row per group (``groups.GroupStats``): runs, mean and 95% interval of the
    final and best values, the budget to a target, and the verdict against the best."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    better = "higher" if metric in HIGHER_IS_BETTER else "lower"
    table = Table(title=f"{metric} by group ({better} is better; 95% intervals)",
                  title_justify="left", box=None, pad_edge=False)  # fmt: skip
    targeted = any(g.target is not None for g in groups)
    headers = ["#", "group", "n", "mean", "ci95", "std", "best mean"]
    headers += ["reached", "steps to target"] if targeted else []
    headers += ["vs", "difference", "p", "verdict"]
    for header in headers:
        table.add_column(header, overflow="fold")
    for rank, g in enumerate(groups, 1):
        n = f"{g.n}" + (f" ({g.diverged} diverged)" if g.diverged else "")
        row = [str(rank), g.group, n, _number(g.mean), _interval(g.ci95), _number(g.std),
               _number(g.best_mean)]  # fmt: skip
        if targeted:
            row += [f"{g.reached}/{g.n}", _number(g.steps_to_target)]
        p = "-" if g.p_value is None else f"{g.p_value:.3g}"
        row += [g.versus or "-", _number(g.difference), p, g.verdict]
        table.add_row(*row)
    narrow = console.width
    console.width = max(narrow, 160)  # a row per group, never squeezed into cut numbers
    try:
        console.print(table)
    finally:
        console.width = narrow
