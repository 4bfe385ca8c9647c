"""Spool files: what a run could not deliver to MLflow, kept as JSON lines to send later.

The first line names the run (tracking URI, experiment, run name and id); each further line
is one queued record (``params``, ``tags``, ``text``, ``artifacts``, ``metrics``, ``end``) in
the order it was logged.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from kithara_ops.errors import first_line

log = logging.getLogger("kithara_ops.tracking")


def write_spool(directory: Path, header: dict, pending: list) -> Path:
    """Write ``pending`` records after ``header`` to a new file in ``directory``.

    Args:
      directory: the spool folder (created if missing).
      header: the run's identity: ``tracking_uri``, ``experiment``, ``run_name``, ``run_id``.
      pending: ``(kind, payload)`` records, oldest first.

    Returns:
      The file written, ``<run id or "unstarted">-<unix time>.jsonl``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{header['run_id'] or 'unstarted'}-{int(time.time())}.jsonl"
    with path.open("w") as f:
        f.write(json.dumps({"kind": "run", "payload": header}) + "\n")
        for kind, payload in pending:
            f.write(json.dumps({"kind": kind, "payload": payload}) + "\n")
    return path


def save_undelivered(directory: Path, header: dict, pending: list, where: str) -> Path | None:
    """``write_spool``, and one warning line saying what was saved where (or lost, and why).

    Args:
      where: how to name the store the records did not reach, e.g. ``MLflow at <uri>``.

    Returns:
      The spool file, or ``None`` when it could not be written (a full or read-only disk must
      not fail the end of the run too).
    """
    points = sum(len(payload) for kind, payload in pending if kind == "metrics")
    others = len(pending) - sum(kind == "metrics" for kind, _ in pending)
    try:
        spool = write_spool(directory, header, pending)
    except OSError as err:
        log.warning(
            "%d metric points and %d other records not delivered to %s could not be saved in "
            "%s either (%s).",
            points,
            others,
            where,
            directory,
            first_line(err),
        )
        return None
    log.warning(
        "%d metric points and %d other records were not delivered to %s and are saved in %s "
        "(send them later with kithara_ops.tracking.replay_spool).",
        points,
        others,
        where,
        spool,
    )
    return spool
