"""A checkpoint's trained model, written where other tools load it.

``export(checkpoint_dir, out, format=...)`` rebuilds the run's model from its record (a
preset is loaded from its handle again, as a resume would), restores the checkpoint's
weights into it and writes it with the library's own saver:

- ``keras-hub``: ``save_to_preset`` (config, weights, tokenizer), which
  ``keras_hub.models.CausalLM.from_preset(out)`` loads;
- ``hf``: KerasHub's ``export_to_transformers`` (safetensors, config, tokenizer) for the
  families it converts;
- ``keras``: a ``model.keras`` file, for the built-in and your own models;
- ``peft``: a LoRA run's adapters alone, as a PEFT adapter folder with Hugging Face module
  names (``export_peft``), for the families KerasHub exports to Hugging Face.

Every format's folder also gets the chat template the run trained with
(``chat_template.jinja``, and ``tokenizer_config.json``'s key for ``hf``) and a
``generation_config.json`` with the family's stop tokens (``export_files``); its files get
the permissions the umask gives.

In the other formats LoRA adapters are merged: Keras saves a LoRA layer's kernel as ``kernel + A·B·scale``, so the
exported model is a plain one of the base's architecture.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from kithara_ops.errors import ConfigError, first_line
from kithara_ops.export_files import (
    hf_gaps,
    ordinary_permissions,
    trained_template,
    write_chat_files,
)

log = logging.getLogger("kithara_ops.export")

FORMATS = ("keras-hub", "hf", "keras", "peft")
"""What ``export`` writes: a KerasHub preset, Hugging Face safetensors, a ``.keras`` file, or
a LoRA adapter folder."""

EXPORT_TAG = "kithara_ops.export"
"""Prefix of the MLflow tags naming where a run's model was exported (one per format)."""


def export(
    checkpoint_dir: str | Path,
    out: str | Path,
    *,
    format: str = "keras-hub",
    step: int | None = None,
    model: str | None = None,
    chat_template: str | Path | None = None,
    verify: bool = True,
) -> Path:
    """Write the model of a checkpoint to ``out`` and return the path written.

    Args:
      checkpoint_dir: the run's checkpoint directory.
      out: a new (or empty) folder for ``keras-hub``, ``hf`` and ``peft``; for ``keras``
        the folder gets ``model.keras``.
      format: one of ``FORMATS``.
      step: the checkpoint to export; the newest readable one by default.
      model: the model spec, for a run whose model came from a ``module:function`` factory
        (a checkpoint never names code to run), or its preset folder where it is now (its
        fingerprint must match the run's).
      chat_template: the run's chat template file where it is now, instead of the path the
        checkpoint recorded.
      verify: for ``hf``, load the written folder back with KerasHub (sharded like the run)
        and compare its logits with the trained model's on a few tokens; a folder that does
        not load back, or gives other logits, is removed and refused. One more load of the
        model: pass ``False`` to skip it for a model known to convert.

    Raises:
      ConfigError: a bad format, step or output folder, a model the format cannot hold, or a
        family KerasHub cannot convert to Hugging Face.
    """
    from kithara_ops.build import check_named_code
    from kithara_ops.checkpoint.checkpointer import Checkpointer

    if format not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {format!r}.")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{str(out)!r} exists and is not an empty folder: choose a new --out.")
    if not Path(checkpoint_dir).is_dir():
        raise ConfigError(f"Checkpoint directory {str(checkpoint_dir)!r} does not exist.")
    with contextlib.closing(Checkpointer(checkpoint_dir)) as store:
        chosen = step is not None
        step, record = _readable(store, step)
        config = record.run_config()
        check_named_code(record, model is not None, "export")
        if model is not None:
            config = config.replace(model=model)
        if chat_template is not None:
            config = config.replace(chat_template=str(chat_template))
        if config.quantize != "none" and format in ("hf", "peft"):
            raise ConfigError(
                f"The run's base is quantized ({config.quantize}), which has no {format} form "
                "here: export it with --format keras-hub (Keras merges the adapters into the "
                "quantized kernels and quantizes them again)."
            )
        rebuilt = "optimizer" not in record.given
        keras_model, tokenizer = _restored_model(store, config, rebuilt, step, chosen=chosen)
    if format == "peft":
        from kithara_ops.export_peft import write_adapter

        written = write_adapter(keras_model, config.model.removeprefix("hf://"), out)
    else:
        written = _write(keras_model, tokenizer, out, format)
        if format == "hf" and verify:
            _verify_hf(keras_model, config, written)
        write_chat_files(out, tokenizer, trained_template(tokenizer))
    ordinary_permissions(out)
    _record(config, record.run_uid, format, written)
    return written


def _readable(store: Any, step: int | None) -> tuple[int, Any]:
    """``step`` (or the newest checkpoint whose record reads) and its ``RunRecord``."""
    saved = store.steps()
    if step is not None and step not in saved:
        listed = ", ".join(map(str, saved)) or "none"
        raise ConfigError(f"No checkpoint of step {step} (saved steps: {listed}).")
    for candidate in [step] if step is not None else reversed(saved):
        try:
            return candidate, store.read_record(candidate)
        except ConfigError:
            raise
        except Exception as err:
            if step is not None:
                message = f"Checkpoint step {step} cannot be read ({first_line(err)})."
                raise ConfigError(message) from None
    raise ConfigError(f"No readable checkpoint in {str(store.directory)!r}.")


def _restored_model(
    store: Any, config: Any, rebuilt: bool, step: int, chosen: bool
) -> tuple[Any, Any]:
    """The run's model rebuilt from ``config`` with the weights of checkpoint ``step``;
    ``rebuilt``: the run's optimizer was a spec, which rebuilds its state too.

    A run may still be writing the directory and rotate ``step`` away while it is read:
    unless ``step`` was ``chosen``, the newest checkpoint not yet tried is read instead.
    """
    from kithara_ops import data
    from kithara_ops.build import build_model
    from kithara_ops.checkpoint.restore import UnreadableCheckpoint, restore
    from kithara_ops.optim.spec import build_optimizer
    from kithara_ops.program import Program

    tokenizer = data.run_tokenizer(config.tokenizer, config.model, config.chat_template)
    keras_model = build_model(config, tokenizer.vocab_size)
    # The optimizer's state is not exported: a run whose optimizer was a Python object
    # restores with a stand-in whose state is dropped (as with reset_optimizer).
    spec = config.optimizer if rebuilt else "optax.sgd(0.1)"
    if not rebuilt and "schedule_free" in str(config.optimizer).lower():
        # Its averaged parameters need the optimizer state, which only a spec rebuilds.
        log.warning(
            "The run's schedule-free optimizer was a Python object: the export holds its "
            "gradient point y, not the averaged parameters; train with an --optimizer spec to "
            "export those."
        )
    optimizer = build_optimizer(spec, config.learning_rate, config.weight_decay)
    program = Program(keras_model, optimizer, config)
    template, tried = program.template(), []
    while True:
        try:
            restored = restore(store, step, template, reset_optimizer=not rebuilt)
            break
        except UnreadableCheckpoint as err:
            if chosen:
                raise ConfigError(f"Checkpoint step {step} cannot be read ({err}).") from None
            tried.append(step)
            store.refresh()
            left = [s for s in store.steps() if s not in tried]
            if not left:
                raise ConfigError(
                    f"No readable checkpoint in {str(store.directory)!r} (last tried: step "
                    f"{step}, {err})."
                ) from None
            log.warning(
                "Checkpoint step %d cannot be read (%s; a run writing the directory may have "
                "rotated it away): exporting step %d.", step, err, left[-1],
            )  # fmt: skip
            step = left[-1]
    program.write_back(restored.state)
    return keras_model, tokenizer


def _write(keras_model: Any, tokenizer: Any, out: Path, format: str) -> Path:
    """Save ``keras_model`` (and its tokenizer) in ``format`` under ``out``."""
    if format == "keras":
        out.mkdir(parents=True, exist_ok=True)
        path = out / "model.keras"
        keras_model.save(path)
        return path
    if not hasattr(keras_model, "save_to_preset"):
        raise ConfigError(
            f"The model {keras_model.name!r} is not a KerasHub model, so it has no "
            f"{format} form: export it with --format keras."
        )
    if format == "keras-hub":
        keras_model.save_to_preset(str(out))
        if getattr(keras_model, "preprocessor", None) is None and hasattr(tokenizer, "tokenizer"):
            tokenizer.tokenizer.save_to_preset(str(out))
        return out
    from kithara_ops.export_peft import lora_layers, merged_lora

    try:
        with merged_lora(lora_layers(keras_model)):
            keras_model.export_to_transformers(str(out))
    except (ValueError, NotImplementedError, KeyError) as err:
        raise ConfigError(
            f"KerasHub cannot export {type(keras_model).__name__} to Hugging Face "
            f"({first_line(err)}): use --format keras-hub."
        ) from None
    return out


def _verify_hf(trained: Any, config: Any, folder: Path) -> None:
    """Load an ``hf`` export back with KerasHub and compare logits; refuse it if they differ.

    KerasHub's exporters and its loaders are separate code, and for some families and
    shapes they disagree (keras-hub 0.32 writes no ``architectures`` for GPT-2, Gemma and
    Qwen 2, and only the first key/value head of a grouped Gemma); a folder that cannot
    come back is no export, and the refusal names what it lacks (``hf_gaps``).
    """
    import numpy as np

    from kithara_ops.build import build_model

    gaps = hf_gaps(folder)
    if gaps:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        raise ConfigError(
            f"KerasHub wrote an incomplete Hugging Face folder for {type(trained).__name__} "
            f"({'; '.join(gaps)}): use --format keras-hub."
        )
    ids = (np.arange(8, dtype="int32")[None] * 7 + 3) % int(trained.backbone.vocabulary_size)
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    try:
        plain = config.replace(
            model=str(folder), lora_rank=None, lora_targets=None, lora_alpha=None
        )
        loaded = build_model(plain, int(trained.backbone.vocabulary_size))
        expected, got = (
            np.asarray(trained(inputs), "float32"),
            np.asarray(loaded(inputs), "float32"),
        )
        tol = 1e-3 if str(trained.dtype_policy.compute_dtype) == "float32" else 3e-2
        scale = max(1.0, float(np.abs(expected).max()))
        if got.shape != expected.shape or not np.allclose(
            got, expected, rtol=tol, atol=tol * scale
        ):
            worst = float(np.abs(got - expected).max()) if got.shape == expected.shape else "n/a"
            raise ValueError(f"its logits differ from the trained model's by {worst}")
    except Exception as err:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        # A bare KeyError reads "('name')": say what was missing.
        reason = f"no {err.args[0]!r} entry" if isinstance(err, KeyError) else first_line(err, 160)
        raise ConfigError(
            f"KerasHub wrote a Hugging Face folder for {type(trained).__name__} that it cannot "
            f"load back faithfully ({reason}): use --format keras-hub."
        ) from None


def _record(config: Any, run_uid: str, format: str, written: Path) -> None:
    """Tag the run's MLflow run with where its model was exported (nothing is uploaded)."""
    if not config.tracking:
        return
    try:
        from mlflow import MlflowClient

        from kithara_ops.tracking.experiments import experiment_id
        from kithara_ops.tracking.tracker import resolve_experiment
        from kithara_ops.tracking.writer import RUN_UID_TAG

        client = MlflowClient(config.tracking_uri)
        experiment = experiment_id(client, resolve_experiment(config))
        query = f"tags.`{RUN_UID_TAG}` = '{run_uid}'"
        runs = client.search_runs([experiment], query, max_results=1) if experiment else []
        if runs:
            client.set_tag(runs[0].info.run_id, f"{EXPORT_TAG}.{format}", str(written.resolve()))
    except Exception as err:  # the export itself is done; MLflow being away must not undo it
        log.warning("The export was not recorded in MLflow (%s).", first_line(err))
