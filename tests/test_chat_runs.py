"""A LoRA run of a tiny Llama preset on chat data: it travels, and its exports are complete."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import BATCH
from typer.testing import CliRunner

from kithara_ops import RunConfig
from kithara_ops.build import build_trainer, resume
from kithara_ops.cli import app
from kithara_ops.errors import ConfigError
from kithara_ops.export import export

TEMPLATE = (  # a Llama-2-style chat template, with the tokenizer's own start and end texts
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
    """A 2-step LoRA run started in folder ``a`` with relative paths; ``b`` is elsewhere."""
    root = tmp_path_factory.mktemp("chat_runs")
    started, elsewhere = root / "a", root / "b"
    write_inputs(started, tiny_presets["llama"])
    elsewhere.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(started)
        config = RunConfig(
            model="base", data="chat.jsonl", chat_template="chat.jinja", lora_rank=2,
            seq_len=16, batch_size=BATCH, steps=2, save_every=2, checkpoint_dir="ckpt",
            tracking=False, system_metrics=False, optimizer="optax.adam(1e-2)",
        )  # fmt: skip
        build_trainer(config).train()
    return started, elsewhere


def test_a_run_resumes_and_exports_from_another_directory(run, monkeypatch):
    started, elsewhere = run
    monkeypatch.chdir(elsewhere)
    assert resume(started / "ckpt", steps=3).step == 3
    written = export(started / "ckpt", elsewhere / "hub", format="keras-hub")
    assert (written / "config.json").is_file()


def test_moved_inputs_are_named_again_and_checked(run, tmp_path, monkeypatch):
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
