"""``kithara-ops train``: build a run from options and train it.

Its config options are generated from ``RunConfig``'s fields (see ``cli.options``); the
options declared here are the ones that are not part of a run's config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core

from kithara_ops.cli.app import USAGE_ERRORS, app, user_errors
from kithara_ops.cli.options import (
    JsonOutput,
    Quiet,
    ResetOptimizer,
    config_values,
    with_config_options,
)
from kithara_ops.config import RunConfig, load_config
from kithara_ops.config.fields import CKPT
from kithara_ops.errors import ConfigError
from kithara_ops.preflight import check_surroundings
from kithara_ops.stopping import check_stopping_has_eval

CONFIG = "Config"


class OneLineErrors(typer.core.TyperCommand):
    """A command whose option errors (``--steps abc``, a typo) are one ``Error:`` line, exit 2.

    Click would print a usage block and a framed message; a script reading stderr, like a
    person, needs the one line that says what is wrong (click's own text, with its
    did-you-mean). Only the command line's own parse is changed: a caller that parses the
    options itself (``sweep`` passing options on) still gets the ``UsageError``.
    """

    def make_context(self, info_name, args, parent=None, **extra):
        if parent is None or parent.resilient_parsing:
            return super().make_context(info_name, args, parent=parent, **extra)
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except USAGE_ERRORS as err:
            typer.echo(f"Error: {' '.join(err.format_message().split())}", err=True)
            raise typer.Exit(2) from None


def resolve_config(config_file: Path | None, options: dict[str, Any]) -> RunConfig:
    """The run's config: the file's values (if any), then the options given, then defaults.

    ``options`` are a command's parameters as the command line gave them (``None``: not
    given); only given ones override the file, so a file plus a single flag changes that one
    setting. Parameters that are not config options are ignored.
    """
    base = load_config(config_file) if config_file is not None else RunConfig()
    return base.replace(**config_values(options))


@app.command(
    cls=OneLineErrors,
    epilog=(
        "Examples:\n\n"
        "  kithara-ops train\n\n"
        "  kithara-ops train --config run.yaml --steps 500\n\n"
        "  kithara-ops train --optimizer keras.AdamW --learning-rate 3e-4 --steps 500\n\n"
        "  kithara-ops train --model small --sharding fsdp --batch-size 16\n\n"
        "  kithara-ops train --model presets/gemma --lora-rank 8 --dry-run --device-memory 16GiB\n\n"
        "  kithara-ops launch --num-processes 2 -- train --sharding fsdp"
    ),
)
@with_config_options(after="print_config")
@user_errors
def train(
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="A YAML, TOML or JSON file of train options (e.g. a run's config/run.yaml); "
            "options given here override it.",
            rich_help_panel=CONFIG,
        ),
    ] = None,
    print_config: Annotated[
        bool,
        typer.Option(
            "--print-config",
            help="Print the resolved config as YAML and exit.",
            rich_help_panel=CONFIG,
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print the memory plan (bytes per device from the compiled step, without "
            "loading weights or data) and exit; with --json, as one document.",
            rich_help_panel=CONFIG,
        ),
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue from the newest checkpoint in --checkpoint-dir, if any.",
            rich_help_panel=CKPT,
        ),
    ] = False,
    reset_optimizer: ResetOptimizer = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Delete the checkpoints --checkpoint-dir holds and start afresh (a fresh run "
            "into a directory with checkpoints is refused otherwise).",
            rich_help_panel=CKPT,
        ),
    ] = False,
    quiet: Quiet = False,
    json_output: JsonOutput = False,
    **options: Any,
) -> None:
    """Train a model: the built-in tiny transformer on the stdlib corpus by default."""
    config = resolve_config(config_file, options)
    if print_config:
        typer.echo(config.dump_yaml(), nl=False)
        return
    if dry_run:
        from kithara_ops.plan import plan_run

        plan = plan_run(config)
        typer.echo(json.dumps(plan.to_dict()) if json_output else "\n".join(plan.lines()))
        return
    if (resume or reset_optimizer) and config.checkpoint_dir is None:
        raise ConfigError("--resume needs --checkpoint-dir DIR: the directory to resume from.")
    if overwrite and resume:
        raise ConfigError("--overwrite starts afresh and --resume continues: pass one of them.")
    # JAX, Keras and the model code load only now: a bad option, tracking URI or checkpoint
    # path is answered in a fraction of a second, not after seconds of imports.
    check_surroundings(config.tracking, config.tracking_uri, config.checkpoint_dir)
    check_stopping_has_eval(config, config.eval_data is not None)
    from kithara_ops.build import build_trainer
    from kithara_ops.cli.progress import print_summary, stdout_for_json

    with stdout_for_json(json_output):
        trainer = build_trainer(config, progress=not (quiet or json_output))
        result = trainer.train(resume=resume, reset_optimizer=reset_optimizer, overwrite=overwrite)
    print_summary(result, as_json=json_output)
