"""Samples during training: what the model writes for fixed prompts, every few steps.

``--eval-prompts FILE`` names a JSONL file, one prompt per line: ``{"prompt": "..."}`` (fed
as a training document's prompt is, after the start id) or ``{"messages": [...]}`` (rendered
with the run's chat template and its generation prompt, as chat data is), each with an
optional ``"reference"``. Every ``generate_every`` steps, and at the last, each prompt is
completed greedily with up to ``max_new_tokens`` tokens, on the training mesh, from the
state being trained (LoRA applied; a schedule-free optimizer's average, as evaluation
uses). KerasHub causal LMs generate with their own ``generate_step`` and a greedy sampler;
other models with a greedy loop over their logits. Generation reads the state and writes
nothing back: the training state, its random key and the Keras variables stay as they
were, so a run with samples resumes exactly like one without.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kithara_ops.errors import ConfigError

SAMPLES_FILE = "samples.json"
"""The run artifact the samples table is logged to (``mlflow.log_table``; rows append)."""

LENGTH_METRIC = "samples.completion_tokens"
"""The mean completion length, logged with every step's rows (its history says which steps
a run's table already holds)."""

MAX_PROMPTS = 64
"""Prompts a file may hold: each generation step completes them all, in one batch."""


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt of ``--eval-prompts``: ``shown`` (its text for the table), the token
    ids the model is fed, and the expected answer if the file gives one."""

    shown: str
    ids: tuple[int, ...]
    reference: str | None


def read_prompts(path: str | Path, tokenizer: Any) -> list[EvalPrompt]:
    """The prompts of a JSONL file, tokenized as training would tokenize them.

    Raises:
      ConfigError: the file is missing, empty or too long, or a line is not a JSON object
        with a string ``prompt`` or a ``messages`` list (and a string ``reference`` if any).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"eval_prompts {str(path)!r} is not a file: pass a JSONL file.")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not 0 < len(lines) <= MAX_PROMPTS:
        raise ConfigError(
            f"eval_prompts {str(path)!r} holds {len(lines)} prompts: give 1 to {MAX_PROMPTS}."
        )
    return [_prompt(line, tokenizer, f"{str(path)!r} line {n}") for n, line in enumerate(lines, 1)]


def _prompt(line: str, tokenizer: Any, where: str) -> EvalPrompt:
    """One JSONL line as an ``EvalPrompt`` (see ``read_prompts``)."""
    try:
        row = json.loads(line)
    except ValueError:
        row = None
    reference = row.get("reference") if isinstance(row, dict) else None
    if not isinstance(row, dict) or not isinstance(reference, str | None):
        raise ConfigError(
            f"eval_prompts {where} is not a JSON object with a string 'prompt' or a "
            "'messages' list (and a string 'reference'): fix the line."
        )
    bos = [] if tokenizer.bos_id is None else [int(tokenizer.bos_id)]
    if isinstance(row.get("prompt"), str):
        return EvalPrompt(
            row["prompt"], (*bos, *map(int, tokenizer.encode(row["prompt"]))), reference
        )
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):  # fmt: skip
        raise ConfigError(
            f"eval_prompts {where} has neither a string 'prompt' nor a 'messages' list of "
            "{'role', 'content'} objects: fix the line."
        )
    from kithara_ops.data.chat import encode_with_specials

    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        raise ConfigError(
            f"eval_prompts {where} is a conversation but the model has no chat template: pass "
            "--chat-template FILE."
        )
    text = template.render(messages, add_generation_prompt=True)
    if bos and template.bos_token and text.startswith(template.bos_token):
        text = text[len(template.bos_token) :]  # the start id is fed once, as in training
    return EvalPrompt(
        messages[-1]["content"], (*bos, *encode_with_specials(tokenizer, text)), reference
    )


def score(completion: str, reference: str | None) -> dict[str, Any]:
    """``exact_match`` (the stripped texts are equal) and ``contains_reference`` (the
    reference appears in the completion); ``None`` for a prompt without a reference."""
    if reference is None:
        return {"exact_match": None, "contains_reference": None}
    return {
        "exact_match": completion.strip() == reference.strip(),
        "contains_reference": reference.strip() in completion,
    }


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The step's metrics: mean completion length in tokens, and the fractions of the
    prompts with a reference that match it exactly or contain it."""
    scored = [row for row in rows if row["reference"] is not None]
    out = {LENGTH_METRIC: float(np.mean([row["tokens"] for row in rows]))}
    if scored:
        out["samples.exact_match"] = float(np.mean([row["exact_match"] for row in scored]))
        out["samples.contains_reference"] = float(
            np.mean([row["contains_reference"] for row in scored])
        )
    return out


class Samples:
    """Completes a fixed list of prompts from a training state (see the module's doc).

    Args:
      program: the run's ``Program`` (model, mesh, keys, optimizer adapter).
      prompts: the prompts, from ``read_prompts``.
      max_new_tokens: the most tokens a completion has.
      tokenizer: the run's tokenizer (decodes completions; its end and turn-end ids stop).
    """

    def __init__(
        self, program: Any, prompts: list[EvalPrompt], max_new_tokens: int, tokenizer: Any
    ):
        from kithara_ops.export_files import stop_ids

        self.prompts, self.max_new_tokens, self.tokenizer = prompts, max_new_tokens, tokenizer
        self.stops = tuple(stop_ids(tokenizer))
        longest = max(len(p.ids) for p in prompts)
        hub = hasattr(program.model, "generate_step")
        # A KerasHub model caches keys and values up to any length its positions allow; other
        # models are run over the run's sequence length, the shape they were trained at.
        limit = _position_limit(program.model) if hub else program.config.seq_len
        self.length = longest + max_new_tokens if hub else program.config.seq_len
        if limit is not None and longest + max_new_tokens > limit:
            raise ConfigError(
                f"The longest eval prompt ({longest} tokens) plus max_new_tokens "
                f"{max_new_tokens} exceeds the {limit} positions the model is run at: "
                "shorten the prompts or lower --max-new-tokens."
            )
        make = _hub_generator if hub else _loop_generator
        self._generate = make(program, self.stops, max_new_tokens)

    def __call__(self, state: Any, step: int) -> list[dict[str, Any]]:
        """One row per prompt: ``step``, ``prompt``, ``completion``, ``reference``,
        ``tokens`` and the scores of ``score``."""
        # The tail is overwritten by generation; KerasHub's sampler stops once every row
        # holds a stop id past its prompt, so the tail must not start out as one.
        filler = next(i for i in range(len(self.stops) + 1) if i not in self.stops)
        ids = np.full((len(self.prompts), self.length), filler, np.int32)
        lengths = np.array([len(p.ids) for p in self.prompts], np.int32)
        for row, prompt in enumerate(self.prompts):
            ids[row, : len(prompt.ids)] = prompt.ids
        out = np.asarray(jax.device_get(self._generate(state, ids, lengths)))
        rows = []
        for row, prompt in enumerate(self.prompts):
            new = [int(t) for t in out[row, lengths[row] : lengths[row] + self.max_new_tokens]]
            cut = next((i for i, t in enumerate(new) if t in self.stops), len(new))
            completion = self.tokenizer.decode(new[:cut])
            rows.append({"step": int(step), "prompt": prompt.shown, "completion": completion,
                         "reference": prompt.reference, "tokens": cut,
                         **score(completion, prompt.reference)})  # fmt: skip
        return rows


def for_program(program: Any) -> Samples | None:
    """The run's ``Samples`` when its config names ``eval_prompts``, else ``None``."""
    config = program.config
    if config.eval_prompts is None:
        return None
    from kithara_ops.data.preset_tokenizer import run_tokenizer

    tokenizer = run_tokenizer(config.tokenizer, config.model, config.chat_template)
    return Samples(
        program, read_prompts(config.eval_prompts, tokenizer), config.max_new_tokens, tokenizer
    )


def _position_limit(model: Any) -> int | None:
    """The most positions a KerasHub backbone embeds (``None``: no limit it states)."""
    limit = getattr(getattr(model, "backbone", None), "max_sequence_length", None)
    return int(limit) if isinstance(limit, int) else None


def _variables(program: Any, state: Any) -> tuple[list, list]:
    """The model's trainable and non-trainable values in ``state``, in the model's order;
    the trainable ones at the point evaluation uses (``adapter.eval_params``)."""
    params = program.adapter.eval_params(state.params, state.opt_state)
    keys = program.key_groups
    return [params[k] for k in keys["params"]], [
        state.non_trainable[k] for k in keys["non_trainable"]
    ]


def _replicated(program: Any) -> jax.sharding.NamedSharding:
    # Every process reads the completions: they come back whole on every device.
    return jax.sharding.NamedSharding(program.mesh, jax.sharding.PartitionSpec())


def _hub_generator(program: Any, stops: tuple[int, ...], max_new_tokens: int) -> Any:
    """KerasHub's own ``generate_step`` with a greedy sampler, run statelessly on ``state``."""
    import keras
    import keras_hub

    model, greedy = program.model, keras_hub.samplers.GreedySampler()

    @functools.partial(jax.jit, out_shardings=_replicated(program))
    def generate(state, ids, lengths):
        trainable, non_trainable = _variables(program, state)
        mapping = [*zip(model.trainable_variables, trainable),
                   *zip(model.non_trainable_variables, non_trainable)]  # fmt: skip
        mask = jnp.arange(ids.shape[1])[None, :] < lengths[:, None]
        own, model.sampler = model.sampler, greedy
        try:
            with keras.StatelessScope(state_mapping=mapping):
                out = model.generate_step({"token_ids": ids, "padding_mask": mask}, stops or None)
        finally:
            model.sampler = own
        return out["token_ids"]

    return generate


def _loop_generator(program: Any, stops: tuple[int, ...], max_new_tokens: int) -> Any:
    """Greedy decoding by the model's logits: ``max_new_tokens`` full forward passes over
    the ``(prompts, seq_len)`` buffer, each writing the argmax after each row's last token
    (a causal model never sees the buffer's tail from earlier positions)."""
    from kithara_ops.models.adapter import takes_training

    model, adapter = program.model, program.model_adapter
    kwargs = {"training": False} if takes_training(model) else {}

    @functools.partial(jax.jit, out_shardings=_replicated(program))
    def generate(state, ids, lengths):
        trainable, non_trainable = _variables(program, state)
        rows = jnp.arange(ids.shape[0])

        def one_token(t, ids):
            outputs, _ = model.stateless_call(
                trainable, non_trainable, adapter.inputs({"x": ids}), **kwargs
            )
            at = jnp.minimum(lengths - 1 + t, ids.shape[1] - 2)
            chosen = jnp.argmax(adapter.logits(outputs)[rows, at], axis=-1).astype(ids.dtype)
            return ids.at[rows, at + 1].set(chosen)

        return jax.lax.fori_loop(0, max_new_tokens, one_token, ids)

    return generate
