"""From a ``RunConfig`` to the live objects of a run: model, optimizer, data, sinks, Trainer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import keras

from kithara_ops import data, distributed, feed, models, preflight
from kithara_ops._backend import seed_keras
from kithara_ops.callbacks import Callback, TrainResult
from kithara_ops.checkpoint.checkpointer import Checkpointer
from kithara_ops.config import LAUNCH_FIELDS, RunConfig
from kithara_ops.errors import ConfigError
from kithara_ops.models.hub import HANDLE_SCHEMES
from kithara_ops.models.registry import output_vocab_size
from kithara_ops.models.remat import remat_scope, rematerialize
from kithara_ops.optim.spec import build_optimizer
from kithara_ops.plan import check_fits
from kithara_ops.program import Program
from kithara_ops.sharding import make_mesh
from kithara_ops.sinks import build_sinks
from kithara_ops.start import final_config
from kithara_ops.trainer import Trainer


def build_trainer(
    config: RunConfig,
    callbacks: Sequence[Callback] = (),
    optimizer: Any = None,
    *,
    progress: bool = False,
    checkpoints: Checkpointer | None = None,
    given: frozenset[str] = frozenset(),
) -> Trainer:
    """Everything a config names, built and handed to a ``Trainer``.

    A multi-process run (``coordinator``, ``num_processes``, ``process_id``, or a cluster
    ``distributed.auto_detect`` recognises) joins its peers first, before any JAX work.
    Data is read before the model is built so a bad path fails in a second, not after
    compilation. ``seed_keras(config.seed)`` makes the initial weights a
    function of the seed alone. The ``preflight`` checks run before anything is created or
    compiled: the tracking URI's scheme, the checkpoint directory (a writable directory with
    room for two checkpoints), and the first batch's token ids against the model's vocabulary.

    Args:
      config: the run's config; ``model``, ``data`` and ``optimizer`` must be specs.
      callbacks: extra callbacks, after the sinks the config asks for.
      optimizer: an optimizer object to use instead of building ``config.optimizer``.
      progress: show a progress bar in the terminal.
      checkpoints: an open ``Checkpointer`` for ``config.checkpoint_dir`` to reuse.
      given: the config fields holding a Python object's label (a checkpoint's
        ``RunRecord.given``): ``model`` and ``data`` cannot be among them, nor ``optimizer``
        unless ``optimizer`` is passed.
    """
    # First: a multi-process run must join its peers before JAX computes anything.
    distributed.initialize(config.coordinator, config.num_processes, config.process_id)
    given = frozenset(given) | ({"optimizer"} if optimizer is not None else set())
    for field in ("model", "data") + (("optimizer",) if optimizer is None else ()):
        if field in given:
            raise ConfigError(
                f"This run's {field} was a Python object ({getattr(config, field)}), which a "
                f"config cannot rebuild: pass the {field} yourself (Trainer(...).train(resume=True))."
            )
    preflight.check_surroundings(config.tracking, config.tracking_uri, config.checkpoint_dir)
    if optimizer is None:
        optimizer = build_optimizer(config.optimizer, config.learning_rate, config.weight_decay)
    tokenizer = data.run_tokenizer(config.tokenizer, config.model, config.chat_template)
    train_data = data.load(
        config.data,
        seq_len=config.seq_len,
        batch_size=config.batch_size,
        seed=config.seed,
        tokenizer=tokenizer,
        packing=config.packing,
    )
    eval_data = None
    if config.eval_data is not None:
        eval_data = data.load(
            config.eval_data,
            seq_len=config.seq_len,
            batch_size=config.batch_size,
            shuffle=False,
            repeat=False,
            tokenizer=tokenizer,
            packing=config.packing,
        )
    model = build_model(config, tokenizer.vocab_size)
    check_packing(config.packing, model)
    first, train_data = feed.peek(train_data)  # a Dataset is re-iterable: nothing is consumed
    if first is not None:
        preflight.check_token_ids(first, output_vocab_size(model, config.seq_len))
    if config.checkpoint_dir:
        preflight.check_checkpoint_room(config.checkpoint_dir, model)
    sinks = build_sinks(config, callbacks, progress=progress, checkpoints=checkpoints)
    config, _, train_data = final_config(model, "", train_data, config, {})
    program = Program(model, optimizer, config, given=given)
    check_fits(program)  # a run that cannot fit ends here, not at its first step
    return Trainer.from_program(program, train_data, eval_data=eval_data, sinks=sinks)


def check_packing(packing: str, model: keras.Model) -> None:
    """Refuse ``packing="documents"`` for a model that cannot keep documents apart.

    KerasHub causal LMs take token ids and a padding mask, no segment ids: packed documents
    would attend to each other, which ``none`` (one document per row) avoids.
    """
    from kithara_ops.models.adapter import adapt_model

    if packing == "documents" and not adapt_model(model).takes_segments:
        raise ConfigError(
            f"packing 'documents' needs a model that takes segment_ids, and {model.name!r} "
            "does not (a KerasHub model takes a padding mask only, so packed documents would "
            "attend to each other): use --packing none, one document per row."
        )


def build_model(config: RunConfig, vocab_size: int) -> keras.Model:
    """The model ``config.model`` names, with its initial weights a function of the seed.

    ``vocab_size`` (the tokenizer's) sizes the built-in models and is offered to factories.
    """
    seed_keras(config.seed)
    with remat_scope(config.remat):
        model = models.resolve_model(
            config.model,
            vocab_size=vocab_size,
            seq_len=config.seq_len,
            dtype=config.precision if config.precision != "float32" else None,
            lora_rank=config.lora_rank,
            lora_targets=config.lora_targets,
            lora_alpha=config.lora_alpha,
            quantize=config.quantize,
            # A preset is loaded into the shardings the Trainer gives it, on the same mesh.
            mesh=make_mesh(config.sharding, config.mesh_shape),
            min_shard_size=config.min_shard_size,
        )
    return rematerialize(model)


def resume(
    checkpoint_dir: str | Path,
    steps: int | None = None,
    optimizer: Any = None,
    *,
    reset_optimizer: bool = False,
    callbacks: Sequence[Callback] = (),
    progress: bool = False,
    **overrides: Any,
) -> TrainResult:
    """Continue a run from its checkpoint directory, rebuilding model, data and optimizer.

    The run's config comes from the newest checkpoint's record, so this works for runs
    started from the CLI or from a config; the state (weights, optimizer state, step, data
    position, RNG) comes from the checkpoint, and logging continues in the same MLflow run.

    Args:
      checkpoint_dir: the run's checkpoint directory.
      steps: the run's new total step count (``None``: the saved config's).
      optimizer: an optimizer to continue with instead of the saved spec's; its state still
        comes from the checkpoint (same kind), is migrated (Keras <-> Optax Adam/AdamW/SGD),
        or is refused unless ``reset_optimizer``.
      reset_optimizer: keep weights and step, start a fresh optimizer state.
      callbacks: extra callbacks.
      progress: show a progress bar in the terminal.
      **overrides: other ``RunConfig`` fields to change (e.g. ``save_every``, ``log_every``,
        or ``coordinator``, ``num_processes`` and ``process_id`` to resume in several
        processes). ``data``, ``eval_data``, ``chat_template``, ``tokenizer`` and ``model``
        name moved inputs again: the training data must give the tokens the checkpoint
        recorded (its digest) and a preset the weights it recorded (its fingerprint). A run whose model came from a ``module:function`` factory needs
        ``model="module:function"`` again: the checkpoint's record is never trusted to name
        code to run.
    """
    # Before the checkpoint is read: a multi-process resume joins its peers first.
    distributed.initialize(**{name: overrides.get(name) for name in LAUNCH_FIELDS})
    if not Path(checkpoint_dir).is_dir():
        raise ConfigError(
            f"Checkpoint directory {str(checkpoint_dir)!r} does not exist: check the path."
        )
    # One manager for the whole resume: it reads the run's record, then saves the run.
    checkpoints = Checkpointer(checkpoint_dir)
    try:
        if jax.process_index() == 0:
            checkpoints.lock.check()  # before its contents, which a live writer changes
        record = newest_record(checkpoints)
        saved_config = record.run_config()
        check_named_code(record, "model" in overrides, "resume")
    except ConfigError:
        checkpoints.close()
        raise
    changes = {**overrides, "checkpoint_dir": str(Path(checkpoint_dir))}
    if steps is not None:
        changes.update(steps=steps, epochs=None)
    if optimizer is not None:
        from kithara_ops.optim.describe import describe_optimizer

        changes["optimizer"] = describe_optimizer(optimizer)["label"]
    config = saved_config.replace(**changes)
    checkpoints.configure(config.save_every, config.keep, config.keep_best)
    trainer = build_trainer(
        config, callbacks, optimizer, progress=progress, checkpoints=checkpoints,
        given=frozenset(record.given) - changes.keys(),
    )  # fmt: skip
    if RENAMED_INPUTS & overrides.keys():
        try:
            check_same_data(record, trainer.train_data, config)
        except ConfigError:
            checkpoints.close()
            raise
    return trainer.train(resume=True, reset_optimizer=reset_optimizer)


RENAMED_INPUTS = frozenset({"data", "chat_template", "model", "tokenizer"})
"""The overrides that name a run's inputs again (moved files): they must give its tokens."""


def check_same_data(record: Any, train_data: Any, config: RunConfig) -> None:
    """Refuse data named again on resume that gives other tokens than the run trained on.

    Compares the packed data's digest with the one the checkpoint recorded (records written
    before it was recorded are not checked); a preset model named again is checked by its
    fingerprint when the state is restored.
    """
    summary = train_data.summary() if hasattr(train_data, "summary") else None
    if not record.data_digest or not summary or summary["digest"] == record.data_digest:
        return
    raise ConfigError(
        f"The data {config.data!r} (chat template {config.chat_template!r}) gives other "
        f"tokens than the run trained on (digest {summary['digest']}, the run's "
        f"{record.data_digest}): name the run's data, chat template and model."
    )


def check_named_code(record: Any, model_given: bool, command: str) -> None:
    """Refuse to rebuild a model from a factory that only a checkpoint's ``record`` names.

    A checkpoint may come from anywhere: the code it names is run only when asked again.
    """
    saved = record.run_config()
    factory = ":" in saved.model and not saved.model.startswith(HANDLE_SCHEMES)
    if factory and "model" not in record.given and not model_given:
        raise ConfigError(
            f"This run's model was built by the factory {saved.model!r}, and a checkpoint "
            f"never runs code it names: pass it again, --model {saved.model} (Python: "
            f"{command}(..., model={saved.model!r}))."
        )


def newest_record(store: Checkpointer) -> Any:
    """The ``RunRecord`` of the newest checkpoint whose record reads back."""
    steps = store.steps()
    if not steps:
        raise ConfigError(
            f"No checkpoint in {str(store.directory)!r}: check the directory (it must hold "
            "numbered step folders)."
        )
    for step in reversed(steps):
        try:
            return store.read_record(step)
        except ConfigError:
            raise
        except Exception:  # a damaged record: the restore reports it and falls back too
            continue
    raise ConfigError(f"No readable checkpoint in {str(store.directory)!r}.")
