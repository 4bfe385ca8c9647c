"""``fit_columns``: which columns a width holds, and how wide each, with nothing cut."""

from kithara_ops.tracking.table import FOLDED_WIDTH, GAP, Column, fit_columns, table_width

RANK = Column("#", ["1", "2"], number=True)
RUN = Column("run", ["optax:clip+adamw lr=1e-3", "keras:adamw lr=3e-4"])  # longest word: 16
LR = Column("lr", ["0.001", "cosine_decay(0.01, 100)"], drop_rank=1)  # longest word: 18
SPEED = Column("tok/s", ["1,234,567", "98,765"], number=True, drop_rank=2)
FINAL = Column("final", ["-1.235e-05", "nan"], number=True)
COLUMNS = [RANK, RUN, LR, SPEED, FINAL]


def test_widths_of_a_column():
    assert (RUN.natural_width, RUN.min_width) == (24, 16)
    assert (LR.natural_width, LR.min_width) == (23, 18)
    assert SPEED.natural_width == SPEED.min_width == 9  # a number never wraps
    assert Column("a long header", ["x"]).min_width == 13  # nor does a header
    assert table_width([1, 24, 10]) == 35 + 2 * GAP


def test_no_width_keeps_every_column_on_one_line():
    kept, widths = fit_columns(COLUMNS, None)
    assert kept == COLUMNS
    assert widths == [1, 24, 23, 9, 10]


def test_a_wide_enough_row_keeps_natural_widths():
    kept, widths = fit_columns(COLUMNS, 200)
    assert kept == COLUMNS and widths == [1, 24, 23, 9, 10]


def test_text_columns_give_room_widest_first_down_to_their_longest_word():
    natural = table_width([1, 24, 23, 9, 10])  # 75
    kept, widths = fit_columns(COLUMNS, natural - 3)
    assert kept == COLUMNS
    assert widths == [1, 22, 22, 9, 10]  # 24 -> 22 and 23 -> 22: three characters
    kept, widths = fit_columns(COLUMNS, table_width([1, 16, 18, 9, 10]))
    assert widths == [1, 16, 18, 9, 10]


def test_columns_are_left_out_by_rank_and_put_back_when_they_fit():
    # One character short of every column's minimum: tok/s (rank 2) goes first, and that is
    # enough for lr (rank 1) to stay.
    just_short = table_width([1, 16, 18, 9, 10]) - 1
    kept, widths = fit_columns(COLUMNS, just_short)
    assert kept == [RANK, RUN, LR, FINAL]
    assert table_width(widths) <= just_short and widths[-1] == 10
    # Room for everything but lr: tok/s (dropped first) comes back once lr is out.
    room = table_width([1, 16, 9, 10])
    kept, widths = fit_columns(COLUMNS, room)
    assert kept == [RANK, RUN, SPEED, FINAL]
    assert widths == [1, 16, 9, 10]


def test_a_too_narrow_width_folds_text_but_keeps_numbers_whole():
    kept, widths = fit_columns(COLUMNS, 20)
    assert kept == [RANK, RUN, FINAL]
    assert widths == [1, FOLDED_WIDTH, 10]  # the row is wider than 20: no number is cut
