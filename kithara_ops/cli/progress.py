"""Terminal display of a run's result: the summary table and the JSON line."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.table import Table

from kithara_ops.callbacks import TrainResult
from kithara_ops.json_values import finite_or_none


def result_dict(result: TrainResult) -> dict:
    """The result as plain values, for ``--json``."""
    return {
        "step": result.step,
        "loss": result.loss,
        "eval_loss": result.eval_loss,
        "seconds": round(result.seconds, 3),
        "compile_seconds": round(result.compile_seconds, 3),
        "metrics": result.metrics,
        "run_id": result.run_id,
        "state_bytes": result.state_bytes,
        "stop_reason": result.stop_reason,
    }


@contextlib.contextmanager
def stdout_for_json(as_json: bool) -> Iterator[None]:
    """With ``as_json``, send everything printed to stdout to stderr while the block runs.

    ``--json`` promises one JSON document on stdout; libraries print there too (MLflow's
    "View run ... at: URL" when a run on a tracking server ends), so while the run is built
    and trained stdout is stderr, and only the summary printed afterwards reaches stdout.
    """
    if not as_json:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def print_summary(result: TrainResult, as_json: bool, console: Console | None = None) -> None:
    """Print the run's outcome as a small table, or one JSON object with ``as_json``.

    The JSON object has ``null`` where a value is not finite (a diverged loss), so any JSON
    parser reads it.
    """
    if as_json:
        print(json.dumps(finite_or_none(result_dict(result)), allow_nan=False))
        return
    console = console or Console()
    table = Table(title="kithara-ops run", show_header=False)
    table.add_row("steps", str(result.step))
    if result.stop_reason:
        table.add_row("stopped early", result.stop_reason)
    table.add_row("final loss", f"{result.loss:.4f}" if result.loss is not None else "-")
    if result.eval_loss is not None:
        table.add_row("eval loss", f"{result.eval_loss:.4f}")
    if "tokens_per_second" in result.metrics:
        table.add_row("tokens/s", f"{result.metrics['tokens_per_second']:,.0f}")
    if result.state_bytes:
        total, most = result.state_bytes["total"], result.state_bytes["per_device"]
        table.add_row("state", f"{_size(total)}, at most {_size(most)} on one device")
    table.add_row("compile", f"{result.compile_seconds:.1f} s")
    table.add_row("wall time", f"{result.seconds:.1f} s")
    if result.run_id:
        table.add_row("MLflow run", result.run_id)
    console.print(table)


def _size(count: int) -> str:
    """A byte count in binary units: ``512 B``, ``15.4 KiB``, ``2.0 GiB``."""
    value, unit = float(count), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
