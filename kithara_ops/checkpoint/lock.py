"""One live writer per checkpoint directory: a lock file naming its owner.

``DIR/.kithara-ops.lock`` holds the owner's pid, host and start time. It is created with
``O_EXCL``, so of two processes starting at once only one gets it. A lock left by a process
of this host that no longer runs is stale and taken over; a lock from another host cannot be
checked from here and is reported with how to remove it.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

from kithara_ops.errors import ConfigError

LOCK_NAME = ".kithara-ops.lock"


class DirectoryLock:
    """The lock of one checkpoint directory, held between ``acquire`` and ``release``."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        """Take the lock, or take over a stale one.

        Raises:
          ConfigError: another live process holds it (or one on another host).
        """
        mine = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self.check()
                self.path.unlink(missing_ok=True)  # stale or unreadable: take it over
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(mine, f)
            self.held = True
            return
        raise ConfigError(f"Could not take the lock {str(self.path)!r}: another process raced us.")

    def check(self) -> None:
        """Refuse, as ``acquire`` would, a directory another live process holds; take nothing.

        What a live writer's directory holds is in flux (saves in progress, checkpoints
        rotated away), so a reader asks this before judging its contents.

        Raises:
          ConfigError: another live process holds the lock (or one on another host).
        """
        owner = None if self.held else self._owner()
        if owner is not None and not _stale(owner):
            raise ConfigError(
                f"Checkpoint directory {str(self.path.parent)!r} is in use by process "
                f"{owner.get('pid')} on {owner.get('host')} (since "
                f"{owner.get('started')}): wait for it, use another --checkpoint-dir, "
                f"or delete {str(self.path)!r} if that process is gone."
            )

    def release(self) -> None:
        """Give the lock back (only if this process holds it)."""
        if self.held:
            owner = self._owner()
            if owner is not None and owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None


def _stale(owner: dict) -> bool:
    """Whether the owner is a process of this host that no longer runs."""
    if owner.get("host") != socket.gethostname():
        return False
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
