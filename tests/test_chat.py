"""Chat data: conversations rendered with a chat template, trained on the replies only.

The model is a tiny KerasHub GPT-2 whose byte-level vocabulary has ChatML's two special
tokens, written with ``save_to_preset``; the template is a ChatML-like Jinja file written
here. Everything runs offline.
"""

import json
import shutil

import numpy as np
import presets
import pytest
from typer.testing import CliRunner

from kithara_ops import data
from kithara_ops.cli import app
from kithara_ops.data.chat import folder_template
from kithara_ops.errors import ConfigError

keras_hub = pytest.importorskip("keras_hub")

CHATML = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'assistant' %}"
    "{{ raise_exception('Conversations must start with a user or system message') }}"
    "{% endif %}"
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "the quick fox"},
    {"role": "assistant", "content": "jumps over the lazy dog"},
    {"role": "user", "content": "and then?"},
    {"role": "assistant", "content": "A small model learns."},
]
# The rendered conversation, cut by hand: prompt spans, then the replies the loss covers.
PROMPT_1 = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nthe quick fox<|im_end|>\n"
    "<|im_start|>assistant\n"
)
REPLY_1 = "jumps over the lazy dog<|im_end|>\n"
PROMPT_2 = "<|im_start|>user\nand then?<|im_end|>\n<|im_start|>assistant\n"
REPLY_2 = "A small model learns.<|im_end|>\n"
IM_START, IM_END = presets.VOCAB_SIZE, presets.VOCAB_SIZE + 1


@pytest.fixture(scope="module")
def chat_preset(tmp_path_factory):
    """A tiny GPT-2 preset folder whose vocabulary knows <|im_start|> and <|im_end|>."""
    hub = keras_hub.models
    vocabulary, merges = presets.bpe_vocabulary("<|endoftext|>")
    vocabulary.update({"<|im_start|>": IM_START, "<|im_end|>": IM_END})
    tokenizer = hub.GPT2Tokenizer(
        vocabulary=vocabulary,
        merges=merges,
        unsplittable_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    )
    backbone = hub.GPT2Backbone(
        vocabulary_size=len(vocabulary), num_layers=1, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=64, dropout=0.0,
    )  # fmt: skip
    preprocessor = hub.GPT2CausalLMPreprocessor(tokenizer, sequence_length=16)
    folder = tmp_path_factory.mktemp("chat") / "gpt2"
    hub.GPT2CausalLM(backbone, preprocessor).save_to_preset(str(folder))
    return folder


@pytest.fixture
def files(tmp_path):
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": MESSAGES}) + "\n")
    return template, chat


def test_a_conversation_renders_with_the_template_and_only_replies_are_trained(chat_preset, files):
    template, chat = files
    tokenizer = data.run_tokenizer("auto", str(chat_preset), str(template))
    assert tokenizer.chat_template.bos_token == "<|endoftext|>"
    rendered = tokenizer.chat_template.render(MESSAGES)
    assert rendered == "<|endoftext|>" + PROMPT_1 + REPLY_1 + PROMPT_2 + REPLY_2

    packed = data.pack(data.read_documents(str(chat)), tokenizer, seq_len=128)
    own = tokenizer.tokenizer
    spans = [(PROMPT_1, 0), (REPLY_1, 1), (PROMPT_2, 0), (REPLY_2, 1)]
    ids = [np.asarray(own.tokenize(text)) for text, _ in spans]
    # One start id (the template's bos_token text is not tokenized a second time), and the
    # pipeline's end id closes the document, trained because a reply ends it.
    stream = np.concatenate([[0], *ids, [0]]).astype(np.int32)
    weight = np.concatenate([[1], *[np.full(len(i), t) for i, (_, t) in zip(ids, spans)], [1]])
    n = len(stream) - 1
    np.testing.assert_array_equal(packed.x[0, :n], stream[:-1])
    np.testing.assert_array_equal(packed.y[0, :n], stream[1:])
    np.testing.assert_array_equal(packed.mask[0, :n], weight[1:])
    assert packed.mask[0, n:].sum() == 0 and len(packed.x) == 1
    # The special tokens are single ids: a header and an end for each of the 5 messages.
    assert (stream == IM_START).sum() == 5 and (stream == IM_END).sum() == 5
    assert stream[1] == IM_START and (stream[:2] == 0).sum() == 1
    trained = packed.y[0][packed.mask[0] == 1]
    assert tokenizer.decode(trained) == REPLY_1 + REPLY_2  # the replies with their ends


def test_a_chat_row_without_a_template_is_a_one_line_error_naming_the_fix(chat_preset, files):
    _, chat = files
    tokenizer = data.run_tokenizer("auto", str(chat_preset))
    assert tokenizer.chat_template is None  # KerasHub presets carry no chat template
    with pytest.raises(ConfigError) as err:
        data.pack(data.read_documents(str(chat)), tokenizer, seq_len=32)
    message = str(err.value)
    assert "\n" not in message and "line 1" in message and "--chat-template FILE" in message


def test_a_hugging_face_folder_brings_its_own_template(chat_preset, files, tmp_path):
    template, chat = files
    folder = tmp_path / "with_template"
    shutil.copytree(chat_preset, folder)
    config = {"chat_template": CHATML, "bos_token": {"content": "<|endoftext|>"}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = data.load_tokenizer(str(folder))
    assert tokenizer.chat_template.origin.endswith("tokenizer_config.json")
    given = data.run_tokenizer("auto", str(chat_preset), str(template))
    ours, theirs = (data.pack(data.read_documents(str(chat)), t, 64) for t in (tokenizer, given))
    np.testing.assert_array_equal(ours.x, theirs.x)
    np.testing.assert_array_equal(ours.mask, theirs.mask)
    # chat_template.jinja wins over the config's key; a list of templates uses 'default'.
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert folder_template(folder)[0] == "{{ messages[0]['content'] }}"
    (folder / "chat_template.jinja").unlink()
    config["chat_template"] = [
        {"name": "tools", "template": "x"},
        {"name": "default", "template": "d"},
    ]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert folder_template(folder)[0] == "d"
    config["chat_template"] = config["chat_template"][:1]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="no 'default'"):
        data.load_tokenizer(str(folder))
    # A template Jinja cannot compile fails chat rows only, never plain text.
    config["chat_template"] = "{% for m in messages %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    broken = data.load_tokenizer(str(folder))
    assert len(data.pack([data.Document("the quick fox")], broken, 4).x) > 0
    with pytest.raises(ConfigError, match="not a valid Jinja template"):
        data.pack(data.read_documents(str(chat)), broken, 64)


def test_python_load_takes_a_template_and_a_keras_hub_tokenizer(chat_preset, files, tmp_path):
    template, chat = files
    own = keras_hub.tokenizers.Tokenizer.from_preset(str(chat_preset))
    dataset = data.load(
        str(chat), seq_len=128, batch_size=1, shuffle=False, tokenizer=own, chat_template=template
    )
    expected = data.pack(
        data.read_documents(str(chat)), data.run_tokenizer("auto", str(chat_preset), template), 128
    )
    batch = next(iter(dataset))
    np.testing.assert_array_equal(batch["x"][0], expected.x[0])
    np.testing.assert_array_equal(batch["mask"][0], expected.mask[0])
    # Hugging Face's {% generation %} markers render as their body.
    marked = tmp_path / "marked.jinja"
    marked.write_text(
        CHATML.replace(
            "{% for m in messages %}", "{% for m in messages %}{% generation %}"
        ).replace("{% endfor %}", "{% endgeneration %}{% endfor %}")
    )
    same = data.load(str(chat), seq_len=128, batch_size=1, tokenizer=own, chat_template=marked)
    np.testing.assert_array_equal(same.packed.x, expected.x)


def test_sentencepiece_control_tokens_in_the_text_become_their_ids(tiny_presets, tmp_path):
    # A Llama-2/Mistral style template writes eos_token after every reply.
    template = tmp_path / "inst.jinja"
    template.write_text(
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}"
        "{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
    )
    tokenizer = data.run_tokenizer("auto", str(tiny_presets["llama"]), str(template))
    assert tokenizer.special_pieces["</s>"] == tokenizer.eos_id == 3
    # SentencePiece itself would split the text '</s>' into pieces.
    assert 3 not in np.asarray(tokenizer.tokenizer.tokenize("a</s>b")).tolist()
    messages = [
        {"role": "user", "content": "the fox"},
        {"role": "assistant", "content": "jumps"},
        {"role": "user", "content": "the dog"},
        {"role": "assistant", "content": "sleeps"},
    ]
    document = data.Document("", messages=tuple(messages), where="row")
    packed = data.pack([document], tokenizer, seq_len=64)
    stream = np.concatenate([packed.x[0, :1], packed.y[0]])
    n = int(np.nonzero(packed.mask[0])[0].max()) + 2  # through the document's end id
    # One start id, the first reply's end as one id, and one end id (the template's last
    # eos_token text is the pipeline's end id, not doubled).
    assert stream[0] == 2 and (stream[:n] == 2).sum() == 1
    assert (stream[:n] == 3).sum() == 2 and stream[n - 1] == 3
    trained = packed.y[0][packed.mask[0] == 1]
    assert trained.tolist().count(3) == 2
    assert tokenizer.decode(trained).replace(" ", "") == "jumpssleeps"


def test_template_errors_and_sandbox_escapes_are_one_line_errors(chat_preset, files, tmp_path):
    template, chat = files
    tokenizer = data.run_tokenizer("auto", str(chat_preset), str(template))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "plain"}\n' + json.dumps({"messages": MESSAGES[2:]}) + "\n")
    with pytest.raises(ConfigError) as err:
        data.pack(data.read_documents(str(bad)), tokenizer, seq_len=32)
    assert "line 2" in str(err.value) and "must start with a user" in str(err.value)
    escape = tmp_path / "escape.jinja"
    escape.write_text("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    sneaky = data.run_tokenizer("auto", str(chat_preset), str(escape))
    with pytest.raises(ConfigError, match="refused"):
        data.pack(data.read_documents(str(chat)), sneaky, seq_len=32)
    mutate = tmp_path / "mutate.jinja"
    mutate.write_text("{{ messages.append(1) }}")
    with pytest.raises(ConfigError, match="refused"):
        data.pack(data.read_documents(str(chat)), data.load_tokenizer("byte", mutate), 32)
    no_reply = tmp_path / "no_reply.jsonl"
    no_reply.write_text(json.dumps({"messages": MESSAGES[:2]}) + "\n")
    with pytest.raises(ConfigError, match="line 1 has no assistant message"):
        data.read_documents(str(no_reply))
    with pytest.raises(ConfigError, match="does not exist"):
        data.load_tokenizer("byte", tmp_path / "missing.jinja")


@pytest.mark.slow
def test_cli_trains_on_chat_data_with_a_template_file(chat_preset, files, tmp_path):
    template, _ = files
    chat = tmp_path / "many.jsonl"
    chat.write_text("".join(json.dumps({"messages": MESSAGES}) + "\n" for _ in range(8)))
    common = ["train", "--model", str(chat_preset), "--data", str(chat), "--steps", "2"]
    common += ["--seq-len", "16", "--batch-size", "8", "--no-tracking", "--json", "--quiet"]
    done = CliRunner().invoke(app, [*common, "--chat-template", str(template)])
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["step"] == 2 and np.isfinite(result["loss"])
    refused = CliRunner().invoke(app, common)
    assert refused.exit_code == 2
    assert "--chat-template FILE" in refused.output
    assert len(refused.output.strip().splitlines()) == 1


MISTRAL = (  # Mistral-7B-Instruct-v0.1's template, as its tokenizer_config.json ships it
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)


@pytest.mark.slow
def test_a_hugging_face_folder_trains_on_chat_data_with_its_own_template(tmp_path):
    folder = tmp_path / "hf_mistral"
    presets.build_causal_lm("mistral", seed=3).export_to_transformers(str(folder))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "chat_template" not in config  # KerasHub's exporter writes none
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": MISTRAL}))
    tokenizer = data.run_tokenizer("auto", str(folder))
    assert (tokenizer.chat_template.bos_token, tokenizer.chat_template.eos_token) == ("<s>", "</s>")
    messages = [{"role": "user", "content": "the fox"}, {"role": "assistant", "content": "jumps"}]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": messages * k}) + "\n" for k in (1, 2, 3) * 4))
    first = data.pack(data.read_documents(str(chat)), tokenizer, seq_len=256)
    stream = np.concatenate([first.x[0, :1], first.y.reshape(-1)])  # windows share a token
    # Document 1: <s> [INST] the fox [/INST] jumps </s>, then document 2 starts with <s>.
    starts, ends = np.nonzero(stream == 2)[0], np.nonzero(stream == 3)[0]
    assert starts[0] == 0 and starts[1] == ends[0] + 1
    reply = first.y[0, : ends[0]][first.mask[0, : ends[0]] == 1]
    assert tokenizer.decode(reply).strip() == "jumps" and first.mask[0, ends[0] - 1] == 1
    # One <s> per conversation and one </s> per reply: the template's are never doubled.
    assert (len(starts), len(ends)) == (12, 4 * (1 + 2 + 3))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": messages[::-1]}) + "\n")
    with pytest.raises(ConfigError, match=r"line 1.*roles must alternate"):
        data.pack(data.read_documents(str(bad)), tokenizer, seq_len=32)
    args = ["train", "--model", str(folder), "--data", str(chat), "--steps", "2", "--seq-len"]
    args += ["16", "--batch-size", "8", "--no-tracking", "--json", "--quiet"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout.strip().splitlines()[-1])["step"] == 2


def test_a_hugging_face_mistral_folder_gets_the_tokenizer_its_preprocessor_names(
    tmp_path, monkeypatch
):
    """KerasHub lists a backbone's tokenizer classes in set order; the Tekken one first
    would load an empty vocabulary from a SentencePiece folder, in some processes only."""
    from keras_hub.src.utils import preset_utils

    from kithara_ops.models.hub import preset_tokenizer

    folder = tmp_path / "hf_mistral"
    presets.build_causal_lm("mistral", seed=3).export_to_transformers(str(folder))
    listed = preset_utils.list_subclasses
    tekken_first = lambda cls: sorted(listed(cls), key=lambda c: "Tekken" not in c.__name__)  # noqa: E731
    monkeypatch.setattr(preset_utils, "list_subclasses", tekken_first)
    tokenizer = preset_tokenizer(str(folder))
    assert type(tokenizer).__name__ == "MistralTokenizer"
    assert tokenizer.vocabulary_size() == presets.VOCAB_SIZE


GEMMA = (  # Gemma's template, as its tokenizer_config.json ships it (abridged error message)
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


def test_gemma_turn_markers_are_single_ids_and_bos_is_not_doubled(tmp_path):
    import io

    import sentencepiece

    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([f"{presets._TEXT} {i}" for i in range(40)]), model_writer=proto,
        vocab_size=presets.VOCAB_SIZE, model_type="bpe", byte_fallback=True, pad_id=0, unk_id=1,
        bos_id=2, eos_id=3, pad_piece="<pad>", bos_piece="<bos>", eos_piece="<eos>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], character_coverage=1.0,
        minloglevel=2,
    )  # fmt: skip
    gemma = keras_hub.models.GemmaTokenizer(proto=proto.getvalue())
    start, end = gemma.token_to_id("<start_of_turn>"), gemma.token_to_id("<end_of_turn>")
    template = tmp_path / "gemma.jinja"
    template.write_text(GEMMA)
    chat = tmp_path / "chat.jsonl"
    messages = [{"role": "user", "content": "the fox"}, {"role": "assistant", "content": "jumps"}]
    chat.write_text(json.dumps({"messages": messages}) + "\n")
    dataset = data.load(
        str(chat), seq_len=64, batch_size=1, tokenizer=gemma, chat_template=template
    )
    x, y, mask = dataset.packed.x[0], dataset.packed.y[0], dataset.packed.mask[0]
    n = int(np.nonzero(y == 3)[0][0]) + 1  # through the document's end id
    stream = np.concatenate([x[:1], y[:n]])
    assert stream[0] == 2 and (stream == 2).sum() == 1  # <bos> once, though the template writes it
    assert (stream == start).sum() == 2 and (stream == end).sum() == 2
    reply = [int(i) for i in np.asarray(gemma.tokenize("jumps"))] + [end]
    assert y[mask == 1].tolist()[: len(reply)] == reply  # the reply, its end, then "\n" and <eos>
    assert gemma.detokenize(y[:n][mask[:n] == 0]).startswith("<start_of_turn>user")
