"""``kithara-ops describe``: what an optimizer spec builds, and the MLflow params it logs."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from kithara_ops.cli.app import app, user_errors
from kithara_ops.cli.options import OUTPUT, LearningRate, WeightDecay


def spec_params(
    spec: str, learning_rate: float | None = None, weight_decay: float | None = None
) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """(description, params, metrics) of the optimizer ``spec`` builds, as ``train`` would.

    ``metrics`` are the step metrics the optimizer adds to those every run logs
    (``optim.monitors.optimizer_metrics``): ``clipped``, ``optim.d``, ``optax.*``.

    The params are the ``optimizer.*`` part of what a run built from ``spec`` logs: they come
    from ``run_params``, the function the tracker calls, so ``optimizer.spec`` and the length
    limits follow the same rules.

    Raises:
      ConfigError: the spec, the learning rate or the weight decay is refused.
    """
    from kithara_ops.callbacks import RunInfo
    from kithara_ops.config import RunConfig
    from kithara_ops.optim.describe import describe_optimizer, optimizer_params
    from kithara_ops.optim.monitors import optimizer_metrics
    from kithara_ops.optim.spec import build_optimizer
    from kithara_ops.tracking.params import MAX_PARAM_LENGTH, run_params

    options = {"optimizer": spec, "learning_rate": learning_rate, "weight_decay": weight_decay}
    # Unset options take the run's defaults, exactly as ``train`` leaves them to RunConfig.
    config = RunConfig.from_dict({k: v for k, v in options.items() if v is not None})
    optimizer = build_optimizer(config.optimizer, config.learning_rate, config.weight_decay)
    description = describe_optimizer(optimizer)
    run = RunInfo(
        config=config,
        model=None,
        optimizer=optimizer,
        description=description,
        num_params=0,
        mesh_shape={},
        start_step=0,
        total_steps=0,
    )
    logged = run_params(run, optimizer_params(description, MAX_PARAM_LENGTH))
    params = {k: v for k, v in logged.items() if k.startswith("optimizer.")}
    return description, params, optimizer_metrics(optimizer, description.get("clipping"))


def _header(description: dict[str, Any]) -> list[tuple[str, str]]:
    from kithara_ops.optim.schedules import value_text

    clipping = description.get("clipping")
    learning_rate = description.get("learning_rate")
    return [
        ("family", str(description.get("family"))),
        ("name", str(description.get("name"))),
        ("label", str(description.get("label"))),
        ("learning rate", "-" if learning_rate is None else value_text(learning_rate)),
        ("clipping", f"{clipping['kind']}={value_text(clipping['value'])}" if clipping else "none"),
        ("chain", description.get("chain_text") or "-"),
    ]


@app.command(
    epilog=(
        "Examples:\n\n"
        "  kithara-ops describe optax.adamw --learning-rate 3e-4 --weight-decay 0.01\n\n"
        "  kithara-ops describe 'optax.chain(optax.clip_by_global_norm(1.0), "
        "optax.adamw(1e-3, weight_decay=0.01))'\n\n"
        "  kithara-ops describe 'keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=0.01, "
        "global_clipnorm=1.0)' --json\n\n"
        "  kithara-ops describe 'optax.adamw(1e-3, mask=\"kernel$\")'  (decay the kernels only)\n\n"
        '  kithara-ops describe \'optax.multi_transform({"a": optax.adam(1e-3), '
        '"s": optax.sgd(1e-2)}, {"embeddings": "s", ".*": "a"})\''
    )
)
@user_errors
def describe(
    spec: Annotated[
        str,
        typer.Argument(
            help="optax.adamw, keras.AdamW, or a call such as 'optax.adamw(1e-3)', as for train.",
            show_default=False,
        ),
    ],
    learning_rate: LearningRate = None,
    weight_decay: WeightDecay = None,
    json_output: Annotated[
        bool,
        typer.Option(
            "--json",
            help='Print one JSON object: {"description": {...}, "params": {...}, '
            '"metrics": [...]}.',
            rich_help_panel=OUTPUT,
        ),
    ] = False,
) -> None:
    """Show what an optimizer spec builds and the exact MLflow params a run with it logs."""
    description, params, metrics = spec_params(spec, learning_rate, weight_decay)
    if json_output:
        shown = {"description": description, "params": params, "metrics": metrics}
        typer.echo(json.dumps(shown, default=str))
        return

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False)
    table = Table(title="MLflow params a run logs", title_justify="left")
    table.add_column("param", no_wrap=True)
    table.add_column("value", overflow="fold")
    for key, value in params.items():
        table.add_row(escape(key), escape(value))
    if not console.is_terminal:  # piped: keep each row on one line, however wide
        wide = console.options.update_width(10_000)
        console.width = max(console.width, console.measure(table, options=wide).maximum)
    for key, value in _header(description):
        console.print(f"[bold]{key + ':':<15}[/bold]{escape(value)}")
    console.print(f"[bold]{'step metrics:':<15}[/bold]{escape(', '.join(metrics) or 'none')} "
                  "(besides loss, grad_norm, update_norm, param_norm, learning_rate)")  # fmt: skip
    console.print()
    console.print(table)
