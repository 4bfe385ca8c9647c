"""The shared helpers: one-line errors, signal handling, experiment look-ups, free ports."""

from __future__ import annotations

import pytest

from kithara_ops.errors import first_line


@pytest.mark.parametrize(
    ("err", "expected"),
    [
        (ValueError("bad value\nTraceback (most recent call last):\n  ..."), "bad value"),
        (RuntimeError("\n\n   server down  \n details"), "server down"),
        (KeyError(), "KeyError"),
        (OSError("  \n \t\n"), "OSError"),
        (KeyboardInterrupt(), "KeyboardInterrupt"),
    ],
)
def test_first_line_is_the_first_non_empty_line_or_the_type_name(err, expected):
    assert first_line(err) == expected


def test_first_line_is_cut_to_the_limit():
    err = ValueError("x" * 500 + "\nmore")
    assert first_line(err) == "x" * 200
    assert first_line(err, limit=10) == "x" * 10
    assert first_line(err, limit=None) == "x" * 500
