"""Small filesystems for tests of full and read-only disks (root only; skipped elsewhere)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at ``path`` with ``options`` (e.g. ``"size=1m"``, ``"ro"``), unmounted
    afterwards; skips the test where mounting is denied."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> None:
    """Write into ``directory`` until its filesystem is full (it may be already)."""
    block = b"\0" * (1 << 16)
    with contextlib.suppress(OSError), open(directory / "filler", "wb") as out:
        while True:
            out.write(block)
            out.flush()
