"""Samples during training: ``--eval-prompts`` completed greedily every few steps, logged to
MLflow as the ``samples.json`` table, shown by ``compare``, and invisible to the training
state (a run with samples resumes bit for bit like one without)."""

import json
import tempfile
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from kithara_ops import Trainer
from kithara_ops.cli import app
from kithara_ops.config import RunConfig
from kithara_ops.data.tokenizer import ByteTokenizer
from kithara_ops.errors import ConfigError
from kithara_ops.export_files import stop_ids
from kithara_ops.models.hub import from_preset
from kithara_ops.samples import read_prompts, score, summary

keras_hub = pytest.importorskip("keras_hub")

PROMPTS = [
    {"prompt": "The quick brown", "reference": "fox"},
    {"prompt": "Low rank adapters change"},
]
NEW_TOKENS = 6


def batches(rows=4, length=16):
    rng = np.random.default_rng(0)
    while True:
        ids = rng.integers(0, 259, (rows, length + 1)).astype("int32")
        yield {"x": ids[:, :-1], "y": ids[:, 1:]}


def lora_run(preset, root, name, steps, *, samples=True, resume=False, **options):
    """A LoRA run of the tiny GPT-2 on fixed batches; with ``samples``, the prompts are
    completed every 2 steps."""
    model = from_preset(str(preset), lora_rank=2, seed=0)
    if samples:
        options.update(eval_prompts=str(root / "prompts.jsonl"), generate_every=2,
                       max_new_tokens=NEW_TOKENS)  # fmt: skip
    trainer = Trainer(
        model, optax.adam(3e-2), batches(), steps=steps, seq_len=16, batch_size=4,
        checkpoint_dir=str(root / name), save_every=2, run_name=name, **options,
    )  # fmt: skip
    return trainer, trainer.train(resume=resume)


@pytest.fixture(scope="module")
def runs(tiny_presets, tmp_path_factory):
    root = tmp_path_factory.mktemp("samples")
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    uri = f"sqlite:///{root}/mlflow.db"
    tracked = {"tracking_uri": uri, "experiment": "samples", "system_metrics": False}
    preset = tiny_presets["gpt2"]
    out = {"root": root, "uri": uri, "preset": preset}
    out["first"], out["first_result"] = lora_run(preset, root, "first", 4, **tracked)
    out["second_result"] = lora_run(preset, root, "second", 4, **tracked)[1]
    out["plain"] = lora_run(preset, root, "plain", 4, samples=False, tracking=False)[0]
    lora_run(preset, root, "split", 2, tracking=False)
    out["split"] = lora_run(preset, root, "split", 4, resume=True, tracking=False)[0]
    return out


def table(runs, result):
    client = MlflowClient(runs["uri"])
    path = client.download_artifacts(result.run_id, "samples.json", tempfile.mkdtemp())
    data = json.loads(Path(path).read_text())
    return [dict(zip(data["columns"], row)) for row in data["data"]]


def test_the_run_logs_one_row_per_prompt_per_generation_step(runs):
    rows = table(runs, runs["first_result"])
    assert [(row["step"], row["prompt"]) for row in rows] == [
        (2, PROMPTS[0]["prompt"]), (2, PROMPTS[1]["prompt"]),
        (4, PROMPTS[0]["prompt"]), (4, PROMPTS[1]["prompt"]),
    ]  # fmt: skip
    assert [row["reference"] for row in rows] == ["fox", None, "fox", None]
    assert all(0 <= row["tokens"] <= NEW_TOKENS for row in rows)
    assert all(isinstance(row["completion"], str) for row in rows)
    assert rows[0]["exact_match"] is False and rows[1]["exact_match"] is None
    metrics = MlflowClient(runs["uri"]).get_metric_history(
        runs["first_result"].run_id, "samples.completion_tokens"
    )
    assert [(m.step, m.value) for m in metrics] == [
        (step, float(np.mean([r["tokens"] for r in rows if r["step"] == step]))) for step in (2, 4)
    ]
    logged = MlflowClient(runs["uri"]).get_run(runs["first_result"].run_id).data
    assert logged.metrics["samples.exact_match"] == 0.0
    assert logged.params["eval_prompts"] == str(runs["root"] / "prompts.jsonl")
    assert logged.params["generate_every"] == "2" and logged.params["max_new_tokens"] == "6"


def test_two_identical_runs_write_the_same_completions(runs):
    first, second = table(runs, runs["first_result"]), table(runs, runs["second_result"])
    assert [row["completion"] for row in first] == [row["completion"] for row in second]
    assert any(row["tokens"] > 0 for row in first)


def test_the_completions_are_keras_hubs_own_greedy_generation(runs):
    # After train() the model holds the trained weights: KerasHub's generate with a greedy
    # sampler must write what the run logged at its last step.
    model, tokenizer = runs["first"].model, runs["first"].samples.tokenizer
    prompts = read_prompts(runs["root"] / "prompts.jsonl", tokenizer)
    stops = stop_ids(tokenizer)
    logged = [row["completion"] for row in table(runs, runs["first_result"]) if row["step"] == 4]
    own = model.preprocessor
    model.preprocessor = None  # generate() then takes token ids as they are
    try:
        model.compile(sampler="greedy")
        for prompt, expected in zip(prompts, logged, strict=True):
            ids = np.full((1, len(prompt.ids) + NEW_TOKENS), 1, "int32")
            ids[0, : len(prompt.ids)] = prompt.ids
            mask = np.arange(ids.shape[1])[None] < len(prompt.ids)
            out = model.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
            new = [int(t) for t in np.asarray(out["token_ids"])[0, len(prompt.ids) :]]
            cut = next((i for i, t in enumerate(new) if t in stops), len(new))
            assert tokenizer.decode(new[:cut]) == expected
    finally:
        model.preprocessor = own


def test_a_run_with_samples_resumes_bit_for_bit_like_one_without(runs):
    plain, split = runs["plain"].state, runs["split"].state
    assert int(split.step) == int(plain.step) == 4
    for key in plain.params:
        np.testing.assert_array_equal(np.asarray(split.params[key]), np.asarray(plain.params[key]))
    for plain_leaf, split_leaf in zip(
        jax.tree.leaves((plain.opt_state, plain.rng)),
        jax.tree.leaves((split.opt_state, split.rng)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(split_leaf), np.asarray(plain_leaf))


def test_compare_shows_each_runs_last_samples(runs):
    done = CliRunner().invoke(
        app, ["compare", "--tracking-uri", runs["uri"], "--experiment", "samples"]
    )
    assert done.exit_code == 0, done.output
    last = [row for row in table(runs, runs["first_result"]) if row["step"] == 4]
    assert f"Samples for {PROMPTS[0]['prompt']}" in done.output
    assert "first @ step 4" in done.output and "second @ step 4" in done.output
    assert repr(" ".join(last[0]["completion"].split())) in done.output
    as_json = CliRunner().invoke(
        app, ["compare", "--tracking-uri", runs["uri"], "--experiment", "samples", "--json"]
    )
    listed = {row["run_name"]: row["samples"] for row in json.loads(as_json.stdout)}
    assert [row["completion"] for row in listed["first"]] == [row["completion"] for row in last]


def test_the_built_in_model_completes_prompts_by_its_own_logits(make_model, stdlib_data, tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "def "}\n{"prompt": "import os"}\n')
    seen = []

    class Rows:
        def __getattr__(self, name):
            return lambda *args: seen.append(args) if name == "on_samples" else None

    trainer = Trainer(
        make_model(), optax.adam(1e-3), stdlib_data, steps=2, tracking=False,
        eval_prompts=str(tmp_path / "p.jsonl"), max_new_tokens=5, callbacks=[Rows()],
    )  # fmt: skip
    trainer.train()
    ((step, rows),) = seen  # generate_every unset: at the last step only
    assert step == 2 and [row["prompt"] for row in rows] == ["def ", "import os"]
    tokenizer = ByteTokenizer()
    for row in rows:  # greedy by hand with the trained model, one token at a time
        ids = [tokenizer.bos_id, *tokenizer.encode(row["prompt"])]
        for _ in range(5):
            buffer = np.zeros((1, 32), "int32")
            buffer[0, : len(ids)] = ids
            ids.append(int(np.argmax(np.asarray(trainer.model(buffer))[0, len(ids) - 1])))
        new = ids[-5:]
        cut = next((i for i, t in enumerate(new) if t == tokenizer.eos_id), 5)
        assert row["completion"] == tokenizer.decode(new[:cut])


def test_bad_prompt_files_are_one_line_errors(tmp_path):
    tokenizer = ByteTokenizer()
    cases = {
        "not json\n": "line 1 is not a JSON object",
        '{"text": "x"}\n': "neither a string 'prompt' nor a 'messages' list",
        '{"prompt": "x", "reference": 3}\n': "line 1 is not a JSON object",
        "": "holds 0 prompts",
        '{"messages": [{"role": "user", "content": "hi"}]}\n': "has no chat template",
    }
    for text, expected in cases.items():
        (tmp_path / "p.jsonl").write_text(text)
        with pytest.raises(ConfigError, match=expected) as err:
            read_prompts(tmp_path / "p.jsonl", tokenizer)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="is not a file"):
        read_prompts(tmp_path / "missing.jsonl", tokenizer)
    with pytest.raises(ConfigError, match="drop --generate-every"):
        RunConfig(generate_every=5)


def test_a_prompt_longer_than_the_model_runs_at_is_refused_before_training(
    make_model, stdlib_data, tmp_path
):
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "x" * 30}) + "\n")
    with pytest.raises(
        ConfigError, match=r"longest eval prompt \(31 tokens\) plus max_new_tokens 8"
    ):
        Trainer(make_model(), optax.adam(1e-3), stdlib_data, steps=1, tracking=False,
                eval_prompts=str(tmp_path / "p.jsonl"), max_new_tokens=8)  # fmt: skip


def test_chat_prompts_are_rendered_with_the_generation_prompt(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    from kithara_ops.data.preset_tokenizer import with_chat_template

    tokenizer = with_chat_template(ByteTokenizer(), template)
    (tmp_path / "p.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "2+2?"}], "reference": "4"}) + "\n"
    )
    (prompt,) = read_prompts(tmp_path / "p.jsonl", tokenizer)
    assert prompt.shown == "2+2?" and prompt.reference == "4"
    assert prompt.ids == (tokenizer.bos_id, *tokenizer.encode("<user>2+2?<assistant>"))


def test_scores_and_summary():
    assert score(" 4\n", "4") == {"exact_match": True, "contains_reference": True}
    assert score("it is 4.", "4") == {"exact_match": False, "contains_reference": True}
    assert score("x", None) == {"exact_match": None, "contains_reference": None}
    rows = [
        {"tokens": 2, "reference": "4", **score("4", "4")},
        {"tokens": 4, "reference": "5", **score("no", "5")},
        {"tokens": 6, "reference": None, **score("x", None)},
    ]
    assert summary(rows) == {
        "samples.completion_tokens": 4.0, "samples.exact_match": 0.5,
        "samples.contains_reference": 0.5,
    }  # fmt: skip
