"""A LoRA run of a tiny Mistral preset on chat data: it travels, and its exports are complete."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from conftest import BATCH
from typer.testing import CliRunner

from kithara_ops import RunConfig
from kithara_ops.build import build_trainer, resume
from kithara_ops.cli import app
from kithara_ops.errors import ConfigError
from kithara_ops.export import export

TEMPLATE = (  # a Mistral-style chat template, with the tokenizer's own start and end texts
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
MESSAGES = [{"role": "user", "content": "the fox"}, {"role": "assistant", "content": "jumps"}]


def write_inputs(folder, preset):
    """The run's inputs under ``folder``: a preset copy, chat rows and a template file."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(preset, folder / "base")
    rows = "".join(json.dumps({"messages": MESSAGES * k}) + "\n" for k in (1, 2, 3) * 8)
    (folder / "chat.jsonl").write_text(rows)
    (folder / "chat.jinja").write_text(TEMPLATE)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_presets):
    """A tracked 2-step LoRA run started in folder ``a`` with relative paths; ``b`` is
    elsewhere."""
    root = tmp_path_factory.mktemp("chat_runs")
    started, elsewhere = root / "a", root / "b"
    write_inputs(started, tiny_presets["mistral"])
    elsewhere.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(started)
        config = RunConfig(
            model="base", data="chat.jsonl", chat_template="chat.jinja", lora_rank=2,
            seq_len=16, batch_size=BATCH, steps=2, save_every=2, checkpoint_dir="ckpt",
            experiment="chat-runs", system_metrics=False, optimizer="optax.adam(1e-2)",
        )  # fmt: skip
        build_trainer(config).train()
    return started, elsewhere


def test_a_run_resumes_and_exports_from_another_directory(run, monkeypatch):
    started, elsewhere = run
    monkeypatch.chdir(elsewhere)
    assert resume(started / "ckpt", steps=3).step == 3
    written = export(started / "ckpt", elsewhere / "hub", format="keras-hub")
    assert (written / "config.json").is_file()


def test_an_hf_export_carries_the_chat_template_and_the_stop_tokens(run, monkeypatch):
    started, elsewhere = run
    monkeypatch.chdir(elsewhere)
    folder = export(started / "ckpt", elsewhere / "hf", format="hf")
    # Where transformers reads a template: the tokenizer_config.json key, chat_template.jinja.
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
    assert (folder / "chat_template.jinja").read_text() == TEMPLATE
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
    hub = export(started / "ckpt", elsewhere / "hub-chat", format="keras-hub")
    assert (hub / "chat_template.jinja").read_text() == TEMPLATE


def test_mlflow_records_the_chat_templates_digest_and_text(run):
    import mlflow

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("chat-runs")
    (logged,) = client.search_runs([experiment.experiment_id])
    digest = hashlib.sha256(TEMPLATE.encode()).hexdigest()[:16]
    assert logged.data.params["chat_template.digest"] == digest
    path = client.download_artifacts(logged.info.run_id, "chat_template/chat_template.jinja")
    assert Path(path).read_text() == TEMPLATE


def test_llama_3_stops_at_the_end_of_a_turn():
    import keras_hub
    import presets

    from kithara_ops.data import PresetTokenizer
    from kithara_ops.export_files import generation_config

    vocabulary, merges = presets.bpe_vocabulary("<|end_of_text|>")
    for token in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        vocabulary[token] = len(vocabulary)
    tokenizer = keras_hub.models.Llama3Tokenizer(vocabulary=vocabulary, merges=merges)
    ids = generation_config(PresetTokenizer(tokenizer))
    end, turn = vocabulary["<|end_of_text|>"], vocabulary["<|eot_id|>"]
    assert ids["bos_token_id"] == vocabulary["<|begin_of_text|>"]
    assert ids["eos_token_id"] == [end, turn]


def test_moved_inputs_are_named_again_and_checked(run, tmp_path, monkeypatch):
    """Last: it removes the run's inputs from where it started."""
    started, _ = run
    moved = tmp_path / "moved"
    write_inputs(moved, started / "base")
    shutil.copytree(started / "ckpt", moved / "ckpt")
    for name in ("base", "chat.jsonl", "chat.jinja"):
        target = started / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    monkeypatch.chdir(moved)
    with pytest.raises(ConfigError, match="does not exist"):
        resume("ckpt", steps=4)
    other = moved / "other.jinja"
    other.write_text(TEMPLATE.replace("[INST]", "[Q]"))
    with pytest.raises(ConfigError, match=r"gives other tokens than the run trained on"):
        resume("ckpt", steps=4, model="base", data="chat.jsonl", chat_template=str(other))
    named = ["--model", "base", "--data", "chat.jsonl", "--chat-template", "chat.jinja"]
    done = CliRunner().invoke(app, ["resume", "ckpt", "--steps", "4", *named, "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout.strip().splitlines()[-1])["step"] == 4
