"""Sending a spool file's records to MLflow once it can be reached again."""

from __future__ import annotations

import json
from pathlib import Path

from kithara_ops.tracking.writer import Delivery, RunWriter


def replay_spool(
    path: str | Path, tracking_uri: str | None = None, timeout: float = 120.0
) -> Delivery:
    """Send a spool file's records to MLflow, in order, into the run they belong to.

    Args:
      path: a spool file written when a run ended with MLflow unreachable.
      tracking_uri: override the URI recorded in the file.
      timeout: seconds to wait for delivery; what is left is spooled again.
    """
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    header = lines[0]["payload"]
    writer = RunWriter(
        tracking_uri or header["tracking_uri"],
        header["experiment"],
        run_name=header["run_name"],
        run_id=header["run_id"],
        spool_dir=Path(path).parent,
    )
    status = "FINISHED"
    for record in lines[1:]:
        if record["kind"] == "end":
            status = record["payload"]["status"]
            continue
        writer._put(record["kind"], record["payload"])
    return writer.finish(status, timeout)
