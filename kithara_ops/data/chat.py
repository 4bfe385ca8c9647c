"""Chat data: conversations rendered with a model's chat template, trained on its replies.

A ``.jsonl`` row ``{"messages": [{"role": ..., "content": ...}, ...]}`` is one conversation.
It is rendered to text with the model's chat template (a Jinja template, as Hugging Face
ships them: ``chat_template.jinja`` or the ``chat_template`` key of ``tokenizer_config.json``
in the model folder, or a file given as ``--chat-template``), in a sandboxed Jinja
environment with ``bos_token``, ``eos_token``, ``add_generation_prompt`` and
``raise_exception`` as Hugging Face's ``apply_chat_template`` provides them. Rendering is
bounded in time per row and in size per rendering (see ``data.sandbox``); a template that
fails or goes past a bound is a one-line error naming the template and the row.

Which tokens are trained: the rendered conversation is cut into spans. Assistant turn ``i``
spans from the end of ``render(messages[:i], add_generation_prompt=True)`` to the end of
``render(messages[:i + 1])``: its content and the template's end-of-turn text. Every other
character (system and user turns, role headers) is prompt and carries no loss. A turn is
trained only if these renderings are prefixes of the whole conversation's; templates that
rewrite earlier turns (e.g. drop an earlier reply's reasoning) therefore train their last
reply only, and a conversation whose last reply cannot be located is refused.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kithara_ops.data import sandbox
from kithara_ops.errors import ConfigError, first_line

ROLES = ("system", "user", "assistant", "tool")
"""Message roles a chat row may use (templates define what each renders to)."""

TEMPLATE_FILE = "chat_template.jinja"
"""The file a Hugging Face model folder keeps its chat template in (newer exports)."""


class ChatTemplate:
    """A compiled chat template and the special-token strings it is rendered with.

    Attributes:
        origin: where the template came from (a file path), for messages.
        bos_token: the text of the model's start token (``""`` if it has none).
        eos_token: the text of the model's end token (``""`` if it has none).
    """

    def __init__(self, source: str, origin: str, bos_token: str = "", eos_token: str = ""):
        self.origin, self.bos_token, self.eos_token = origin, bos_token, eos_token
        # Compiled on first use: a folder's template must not fail runs on plain text.
        self._source, self._template = source, None

    def render(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False
    ) -> str:
        """The text of ``messages``, as Hugging Face's ``apply_chat_template`` renders it.

        Raises:
          ConfigError: the template is not valid Jinja, or it fails or calls
            ``raise_exception`` on these messages.
          sandbox.RenderLimit: it renders more than ``sandbox.MAX_RENDERED_CHARS``.
        """
        from jinja2 import TemplateError

        template = self.compile()
        context = {
            "messages": list(messages),
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        try:
            return sandbox.render_bounded(template, context)
        except sandbox.RenderLimit as err:
            raise sandbox.RenderLimit(f"Chat template {self.origin!r} {err}") from None
        except TemplateError as err:
            raise ConfigError(
                f"Chat template {self.origin!r} refused a conversation ({first_line(err)})"
            ) from None
        except Exception as err:  # the template is code from elsewhere: any failure is its own
            raise ConfigError(
                f"Chat template {self.origin!r} failed on a conversation "
                f"({type(err).__name__}: {first_line(err)})"
            ) from None

    def compile(self) -> Any:
        """The compiled Jinja template (compiled once).

        Raises:
          ConfigError: the template is not valid Jinja.
        """
        if self._template is not None:
            return self._template
        # Imported here: only chat data needs Jinja. The environment is a sandbox because a
        # template is code from a downloaded model folder.
        env = sandbox.sandbox(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=["jinja2.ext.loopcontrols", _generation_extension()],
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(self._source)
        except Exception as err:  # a syntax error, or a source nested too deeply to parse
            raise ConfigError(
                f"Chat template {self.origin!r} is not a valid Jinja template ({first_line(err)}): "
                "fix it or pass another with --chat-template FILE."
            ) from None
        return self._template

    def __repr__(self) -> str:
        return f"ChatTemplate({self.origin!r})"


def _generation_extension() -> type:
    """``{% generation %}...{% endgeneration %}``, which some Hugging Face templates wrap
    their replies in: rendered as its body (replies are located by rendering, see above)."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = frozenset({"generation"})

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    return Generation


def _raise_exception(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **_: Any) -> str:
    """Hugging Face's ``tojson``: plain JSON, without Jinja's HTML escaping."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=False)


def read_template_file(path: str | Path) -> str:
    """The template text of ``path``: a Jinja file, or a ``tokenizer_config.json``.

    Raises:
      ConfigError: the file is missing, or a JSON file holds no ``chat_template``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"Chat template file {str(path)!r} does not exist: pass a Jinja file (such as a "
            f"model's {TEMPLATE_FILE}) or a tokenizer_config.json."
        )
    text = _read_text(path)
    if path.suffix != ".json":
        return text
    try:
        found = _config_template(json.loads(text), str(path))
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"Chat template file {str(path)!r} is not valid JSON ({err.msg})."
        ) from None
    if found is None:
        raise ConfigError(
            f"{str(path)!r} has no 'chat_template' key: pass a Jinja template file instead."
        )
    return found


def folder_template(folder: str | Path) -> tuple[str, str, dict[str, str]] | None:
    """The chat template a Hugging Face model folder ships, if it ships one.

    Returns:
      ``(source, origin, tokens)``: the template text, the file it came from, and the
      ``bos_token``/``eos_token`` strings ``tokenizer_config.json`` names (possibly empty);
      ``None`` when the folder has neither ``chat_template.jinja`` nor a ``chat_template``
      key in ``tokenizer_config.json`` (KerasHub presets never carry one).
    """
    folder = Path(folder).expanduser()
    config_path = folder / "tokenizer_config.json"
    config: dict[str, Any] = {}
    if config_path.is_file():
        try:
            config = json.loads(_read_text(config_path))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{str(config_path)!r} is not valid JSON ({err.msg}).") from None
    tokens = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token")}
    jinja = folder / TEMPLATE_FILE
    if jinja.is_file():
        return _read_text(jinja), str(jinja), tokens
    source = _config_template(config, str(config_path))
    return None if source is None else (source, str(config_path), tokens)


def _read_text(path: Path) -> str:
    """A template or tokenizer config file's text, which must be UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"Chat template file {str(path)!r} is not UTF-8 text (byte {err.start}): "
            "save it as UTF-8."
        ) from None


def _config_template(config: dict[str, Any], origin: str) -> str | None:
    """``chat_template`` of a tokenizer config: a string, or the ``default`` of a list."""
    value = config.get("chat_template") if isinstance(config, dict) else None
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ConfigError(
            f"{origin!r} has a 'chat_template' that is a {type(value).__name__}, not a "
            "template string or a list of named templates: fix it or pass --chat-template FILE."
        )
    named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if isinstance(named.get("default"), str):
        return named["default"]
    raise ConfigError(
        f"{origin!r} has several chat templates ({', '.join(map(str, named))}) and no "
        "'default': pass the one to use with --chat-template FILE."
    )


def _token_text(value: Any) -> str:
    """A token as ``tokenizer_config.json`` writes it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def render_spans(
    template: ChatTemplate, messages: Sequence[dict[str, Any]], where: str
) -> list[tuple[str, bool]]:
    """The conversation's text cut into ``(text, trained)`` spans (see the module docstring).

    Raises:
      ConfigError: the template fails, or the last assistant reply cannot be located in the
        rendered conversation.
    """
    template.compile()  # a template error names the template, not the row
    try:
        with sandbox.time_limit(sandbox.MAX_ROW_SECONDS):
            full, cuts = _cut(template, messages)
    except sandbox.RenderTimeout:
        raise ConfigError(
            f"{where}: chat template {template.origin!r} took more than "
            f"{sandbox.MAX_ROW_SECONDS:g} s to render it: fix the template."
        ) from None
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}: fix the row or the template.") from None
    spans, position = [], 0
    for start, end in cuts:
        spans += [(full[position:start], False), (full[start:end], True)]
        position = end
    spans.append((full[position:], False))
    return [(text, trained) for text, trained in spans if text]


def _cut(
    template: ChatTemplate, messages: Sequence[dict[str, Any]]
) -> tuple[str, list[tuple[int, int]]]:
    """The whole rendering and the ``(start, end)`` of each reply located in it."""
    full = template.render(messages)
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    cuts: list[tuple[int, int]] = []
    for i in replies:
        start, end = _reply_bounds(template, messages, i, full)
        if start is not None and start >= (cuts[-1][1] if cuts else 0):
            cuts.append((start, end))
        elif i == replies[-1]:
            raise ConfigError(
                f"Chat template {template.origin!r} does not render the conversation "
                "with its replies as prefixes, so the reply cannot be located"
            )
    return full, cuts


def _reply_bounds(
    template: ChatTemplate, messages: Sequence[dict[str, Any]], i: int, full: str
) -> tuple[int | None, int]:
    """Where reply ``i`` starts and ends in ``full``; ``(None, 0)`` if it cannot be located."""
    try:
        before = template.render(messages[:i], add_generation_prompt=True)
        through = template.render(messages[: i + 1])
    except sandbox.RenderLimit:
        raise
    except ConfigError:  # e.g. a template that refuses a conversation not ending in a reply
        return None, 0
    if through.startswith(before) and full.startswith(through) and len(through) > len(before):
        return len(before), len(through)
    return None, 0


def encode_with_specials(tokenizer: Any, text: str) -> list[int]:
    """``text``'s ids, with every special-token string the tokenizer knows as its one id.

    KerasHub's byte-pair tokenizers already keep their special tokens whole; SentencePiece
    splits control tokens such as ``<bos>`` written in text into pieces, so the text is cut
    at ``tokenizer.special_pieces`` and only the pieces between are tokenized.
    """
    specials: dict[str, int] = getattr(tokenizer, "special_pieces", None) or {}
    if not specials:
        return [int(i) for i in tokenizer.encode(text)]
    pattern = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
    ids: list[int] = []
    for piece in re.split(f"({pattern})", text):
        if piece in specials:
            ids.append(specials[piece])
        elif piece:
            ids.extend(int(i) for i in tokenizer.encode(piece))
    return ids


def check_messages(record: Any, where: str) -> tuple[dict[str, str], ...]:
    """A chat row's ``messages`` as a tuple of ``{"role", "content"}`` dicts.

    Raises:
      ConfigError: ``messages`` is not a list of messages with a known role and string
        content, or it has no assistant message (nothing to train).
    """
    messages = record.get("messages")
    ok = isinstance(messages, list) and all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
        for m in messages
    )
    if not ok:
        raise ConfigError(
            f"{where} has a 'messages' field that is not a list of {{'role', 'content'}} "
            f"objects with a role in {', '.join(ROLES)} and string content: fix the row."
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise ConfigError(f"{where} has no assistant message, so nothing to train: add the reply.")
    return tuple({**m} for m in messages)


def chat_tokens(
    tokenizer: Any, messages: Sequence[dict[str, Any]], where: str
) -> tuple[np.ndarray, np.ndarray]:
    """A conversation's ids and whether each is trained, without start and end ids.

    Packing frames every document ``[bos] + ids + [eos]``, so a start token the template
    writes first and an end token it writes last are dropped here: the ids are never
    doubled. Each span is tokenized on its own, so a reply's first token never merges with
    the header before it.

    Raises:
      ConfigError: the tokenizer has no chat template (the fix is ``--chat-template``), or
        the template refuses the conversation.
    """
    template: ChatTemplate | None = getattr(tokenizer, "chat_template", None)
    if template is None:
        raise ConfigError(
            f"{where} is a chat conversation but the model has no chat template: pass "
            "--chat-template FILE (a Jinja template such as the family's chat_template.jinja)."
        )
    spans = render_spans(template, messages, where)
    if spans and template.bos_token and tokenizer.bos_id is not None:
        first, trained = spans[0]
        if first.startswith(template.bos_token):
            spans[0] = (first[len(template.bos_token) :], trained)
    if spans and template.eos_token:
        last, trained = spans[-1]
        if last.endswith(template.eos_token):
            spans[-1] = (last[: -len(template.eos_token)], trained)
    ids, weights = [], []
    for text, trained in spans:
        span_ids = encode_with_specials(tokenizer, text) if text else []
        ids += span_ids
        weights += [trained] * len(span_ids)
    return np.asarray(ids, np.int32), np.asarray(weights, bool)
