"""A sink that shows a run in the terminal: a progress bar with loss and tokens/s."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kithara_ops.callbacks import Callback, RunInfo, StepRecord


class ProgressBar(Callback):
    """A rich progress bar advanced every step, with metrics refreshed at logging steps."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self.task = None

    def on_train_start(self, run: RunInfo) -> None:
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[metrics]}"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.task = self.progress.add_task(
            "train", total=run.total_steps, completed=run.start_step, metrics="compiling…"
        )
        self.progress.start()

    def on_step(self, record: StepRecord) -> None:
        self.progress.update(self.task, completed=record.step)

    def on_log(self, step, metrics) -> None:
        text = f"loss {metrics['loss']:.4f}"
        if "tokens_per_second" in metrics:
            text += f"  {metrics['tokens_per_second']:,.0f} tok/s"
        self.progress.update(self.task, metrics=text)

    def on_eval(self, step, metrics) -> None:
        self.console.print(
            f"step {step}: eval_loss {metrics['eval_loss']:.4f}  "
            f"perplexity {metrics['perplexity']:.2f}"
        )

    def on_train_end(self, status, result) -> None:
        if self.progress is not None:
            self.progress.stop()
