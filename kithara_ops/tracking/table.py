"""Fit a table's columns into a terminal's width without cutting any value.

Pure layout, no printing: given each column's cells, choose which columns to show and how wide,
so that numbers keep their full width and text wraps between words instead of being cut. A
terminal that is still too narrow loses its least important columns, which the caller can name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

GAP = 2
"""Blank characters between two columns."""


@dataclass(frozen=True)
class Column:
    """One column: its header, its cells as text, and how it may give up room.

    Attributes:
        header: The column's title (short: it is never wrapped).
        cells: One text per row.
        number: Right-aligned and never wrapped (a number is shown whole or not at all).
        drop_rank: 0 for a column that is always shown; when the table does not fit, columns
            with the highest rank are left out first.
    """

    header: str
    cells: Sequence[str]
    number: bool = False
    drop_rank: int = 0

    @property
    def natural_width(self) -> int:
        """The width that holds every cell on one line."""
        return max(len(text) for text in [self.header, *self.cells])

    @property
    def min_width(self) -> int:
        """The narrowest width that cuts nothing: whole numbers, text wrapped between words."""
        if self.number:
            return self.natural_width
        words = [word for text in self.cells for word in text.split()]
        return max(len(text) for text in [self.header, *words])


def table_width(widths: Sequence[int]) -> int:
    """Characters of a row with these column widths and ``GAP`` between columns."""
    return sum(widths) + GAP * max(len(widths) - 1, 0)


def fit_columns(columns: Sequence[Column], width: int | None) -> tuple[list[Column], list[int]]:
    """Choose the columns to show and their widths so that a row fits in ``width``.

    Columns are left out, highest ``drop_rank`` first, until the narrowest layout fits, and
    those that fit again alongside are put back (lowest rank first). Then the text columns give
    up room, the widest first, down to their longest word; if that is not enough, down to
    ``FOLDED_WIDTH`` with long words folded over lines. Numbers always keep their full width,
    so a terminal too narrow even for those gets a row wider than ``width`` (which it wraps)
    rather than a cut number.

    Args:
        columns: Every column, in display order.
        width: The room for a row; ``None`` for no limit (every column, one line per row).

    Returns:
        The columns kept (in the order given) and the width of each.
    """
    if width is None:
        return list(columns), [column.natural_width for column in columns]
    kept = _columns_that_fit(columns, width)
    widths = [column.natural_width for column in kept]
    for floor in (lambda c: c.min_width, lambda c: min(c.min_width, _folded_width(c))):
        widths = _narrow_text(kept, widths, width, floor)
    return kept, widths


FOLDED_WIDTH = 8
"""The narrowest a text column gets, its words folded over lines, when nothing else fits."""


def _folded_width(column: Column) -> int:
    return max(len(column.header), FOLDED_WIDTH)


def _columns_that_fit(columns: Sequence[Column], width: int) -> list[Column]:
    """Leave out the highest-ranked columns until the minimum widths fit, then put back those
    of the left-out ones that still fit, the most important (lowest rank) first."""

    def fits(chosen: Sequence[Column]) -> bool:
        return table_width([column.min_width for column in chosen]) <= width

    kept = list(columns)
    dropped: list[Column] = []
    while not fits(kept) and any(column.drop_rank for column in kept):
        worst = max(kept, key=lambda column: column.drop_rank)
        kept.remove(worst)
        dropped.append(worst)
    for column in sorted(dropped, key=lambda column: column.drop_rank):
        trial = [c for c in columns if c in kept or c is column]
        if fits(trial):
            kept = trial
    return kept


def _narrow_text(
    columns: Sequence[Column], widths: list[int], width: int, floor: Callable[[Column], int]
) -> list[int]:
    """Take characters from the widest text column, one at a time, down to ``floor(column)``,
    until the row fits in ``width`` or no text column can give more."""
    widths = list(widths)
    excess = table_width(widths) - width
    while excess > 0:
        slack = [i for i, c in enumerate(columns) if not c.number and widths[i] > floor(c)]
        if not slack:
            break
        widest = max(slack, key=lambda i: widths[i])
        widths[widest] -= 1
        excess -= 1
    return widths
