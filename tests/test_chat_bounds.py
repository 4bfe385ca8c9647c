"""Chat templates that stall, exhaust memory or fail: each a one-line error naming the
template and the row, within the sandbox's bounds on time and output."""

import json
import time

import pytest
from typer.testing import CliRunner

from kithara_ops import data
from kithara_ops.cli import app
from kithara_ops.data import sandbox
from kithara_ops.errors import ConfigError

ROW = {
    "messages": [
        {"role": "user", "content": "the quick fox"},
        {"role": "assistant", "content": "jumps over the lazy dog"},
    ]
}

TEMPLATES = {
    "nested-loops": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "took more than 0.5 s",
    ),
    "lipsum": ("{{ lipsum(10**7) }}", "'lipsum' is undefined"),
    "recursive-macro": ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "RecursionError"),
    "string-times-huge": ("{{ 'x' * 10**10 }}", "repeats a sequence"),
    "power-huge": ("{{ 10 ** 100000000 }}", "a number too large"),
    "output-huge": (
        "{% for i in range(100000) %}{{ messages[0].content * 100000 }}{% endfor %}",
        "renders more than 4,000,000 characters",
    ),
    "type-error": ("{{ 1 + 'a' }}", "TypeError"),
    "zero-division": ("{{ 1 / 0 }}", "ZeroDivisionError"),
    "range-too-big": ("{{ range(10**6) }}", "OverflowError: Range too big"),
    "import": ("{% import 'other.jinja' as other %}", "no loader"),
    "include": ("{% include 'other.jinja' %}", "no loader"),
}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text(json.dumps(ROW) + "\n")
    return path


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_a_failing_or_runaway_template_is_one_line_naming_template_and_row(
    name, rows, tmp_path, monkeypatch
):
    monkeypatch.setattr(sandbox, "MAX_ROW_SECONDS", 0.5)
    source, expected = TEMPLATES[name]
    template = tmp_path / f"{name}.jinja"
    template.write_text(source)
    tokenizer = data.load_tokenizer("byte", template)
    began = time.monotonic()
    with pytest.raises(ConfigError) as refused:
        data.pack(data.read_documents(str(rows)), tokenizer, seq_len=16)
    assert time.monotonic() - began < 10
    message = str(refused.value)
    assert expected in message and "\n" not in message
    assert str(template) in message and "chat.jsonl' line 1" in message


def test_a_timeout_never_outlives_its_block():
    with sandbox.time_limit(0.05):
        pass
    time.sleep(0.2)  # an expiry after the block would be raised here
    with pytest.raises(sandbox.RenderTimeout), sandbox.time_limit(0.05):
        while True:
            pass


def test_template_files_that_are_not_templates_are_one_line(tmp_path):
    latin = tmp_path / "latin1.jinja"
    latin.write_bytes("{{ 'caf\u00e9' }}".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.jinja' is not UTF-8 text"):
        data.load_tokenizer("byte", latin)
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": 5}))
    with pytest.raises(ConfigError, match=r"tokenizer_config\.json' has a 'chat_template' that"):
        data.load_tokenizer("byte", config)


def test_the_cli_refuses_a_failing_template_with_exit_2(rows, tmp_path):
    template = tmp_path / "broken.jinja"
    template.write_text("{{ 1 / 0 }}")
    result = CliRunner().invoke(
        app, ["train", "--model", "tiny", "--data", str(rows), "--chat-template", str(template),
              "--steps", "1", "--seq-len", "16", "--batch-size", "8", "--no-tracking"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "ZeroDivisionError" in result.output and "Traceback" not in result.output
