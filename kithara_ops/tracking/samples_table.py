"""What each run wrote at its last generation step, read back from its ``samples.json`` table
(``samples.Samples``, logged with ``MlflowClient.log_table``), for ``compare``."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kithara_ops.samples import LENGTH_METRIC, SAMPLES_FILE

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from kithara_ops.tracking.compare import RunSummary


def last_samples(client: MlflowClient, run_id: str) -> list[dict[str, Any]]:
    """The rows of the run's last generation step (none where it logged no samples)."""
    if LENGTH_METRIC not in client.get_run(run_id).data.metrics:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, SAMPLES_FILE, tmp)
        table = json.loads(Path(path).read_text(encoding="utf-8"))
    rows = [dict(zip(table["columns"], values)) for values in table["data"]]
    last = max((row["step"] for row in rows), default=None)
    return [row for row in rows if row["step"] == last]


def samples_by_run(client: MlflowClient, summaries: Sequence[RunSummary]) -> dict[str, list]:
    """``{run_id: last_samples}`` for the runs that logged samples."""
    found = {summary.run_id: last_samples(client, summary.run_id) for summary in summaries}
    return {run_id: rows for run_id, rows in found.items() if rows}


def print_samples(summaries: Sequence[RunSummary], found: dict[str, list], width: int = 60) -> None:
    """Per prompt, each run's completion at its last generation step, one line each."""
    from rich.console import Console
    from rich.markup import escape

    from kithara_ops.tracking.compare import run_names

    if not found:
        return
    console = Console()
    names = dict(zip((s.run_id for s in summaries), run_names(summaries)))
    prompts = list(dict.fromkeys(row["prompt"] for rows in found.values() for row in rows))
    for prompt in prompts:
        console.print(f"\n[bold]Samples[/bold] for {escape(_short(prompt, width))!s}")
        for run_id, rows in found.items():
            for row in (row for row in rows if row["prompt"] == prompt):
                mark = {True: " [match]", False: " [miss]"}.get(row.get("contains_reference"), "")
                line = f"  {names.get(run_id, run_id)} @ step {row['step']}: "
                console.print(escape(line + repr(_short(row["completion"], width)) + mark))


def _short(text: str, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
