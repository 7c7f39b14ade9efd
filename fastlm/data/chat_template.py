"""Chat templates: a checkpoint's Jinja2 template rendered the way ``transformers`` renders it.

A chat template turns ``messages = [{"role": "user", "content": "hi"}, ...]`` into the one
string the model was trained on (control tokens such as ``<|im_start|>`` written as text;
the tokenizer then matches them as special tokens). Templates come from the Hub and are
untrusted code, so they run in jinja2's ``ImmutableSandboxedEnvironment`` with the
environment ``transformers`` gives them:

- ``trim_blocks=True, lstrip_blocks=True`` and the ``loopcontrols`` extension;
- a ``tojson`` filter that does not HTML-escape (``json.dumps(x, ensure_ascii=False)``);
- globals ``raise_exception(msg)`` (the template refuses its input), ``strftime_now(fmt)``,
  a ``dict`` constructor and a ``namespace`` that refuses underscore-prefixed names;
- a ``{% generation %}...{% endgeneration %}`` block that marks assistant text (used for
  assistant-only loss masks);
- the variables ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the
  tokenizer's named special tokens (``bos_token``, ``eos_token``, ...) and any extra
  keyword arguments (which override the special tokens).

Where the template lives (the same order as ``transformers``): ``chat_template.jinja`` in
the checkpoint directory (plus ``additional_chat_templates/<name>.jinja``), else the
``chat_template`` entry of ``tokenizer_config.json`` (a string, or a list of
``{"name", "template"}`` entries giving several named templates).
"""

from __future__ import annotations

import contextvars
import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "CHAT_TEMPLATE_FILE",
    "ChatTemplateError",
    "compile_chat_template",
    "parse_chat_template_entry",
    "read_chat_templates",
    "render_chat",
    "select_chat_template",
]

CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"

# Private-use characters that bracket the output of a {% generation %} block while spans are
# being tracked; removed from the rendered text before it is returned.
_GEN_START, _GEN_END = "\U000f0001", "\U000f0002"
_tracking: contextvars.ContextVar[bool] = contextvars.ContextVar("fastlm_chat_generation_tracking", default=False)


class ChatTemplateError(ValueError):
    """The chat template refused the messages (``raise_exception``) or failed while rendering."""


# --------------------------------------------------------------------------- environment


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}body{% endgeneration %}``: renders ``body``; while spans are tracked,
    brackets it with private markers so :func:`render_chat` can report where it lies."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_block"), [], [], body).set_lineno(lineno)

    def _render_block(self, caller: Any) -> str:
        text = caller()
        return f"{_GEN_START}{text}{_GEN_END}" if _tracking.get() else text


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Dict:
    """``dict(...)`` for templates without handing them the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """jinja2's ``namespace`` refusing underscore-prefixed attribute names."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (jinja's signature trick: `self` may be a kwarg)
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set underscore-prefixed attributes ({name!r})")


@functools.lru_cache(maxsize=32)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile ``source`` in the sandboxed environment described in the module docstring (cached).

    Raises ChatTemplateError on a syntax error, naming the line.
    """
    if not isinstance(source, str):
        raise TypeError(f"chat template must be a str, got {type(source).__name__}")
    if tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit()) < (3, 1, 6):
        raise ImportError(f"chat templates need jinja2>=3.1.6 (older versions have known sandbox escapes), "
                          f"found {jinja2.__version__}")
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                       namespace=_Namespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from e


# --------------------------------------------------------------------------- rendering


def _plain(value: Any, where: str) -> Any:
    """A copy of ``value`` made of JSON types only (what the sandboxed template may see)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k, where): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    raise TypeError(f"{where}: chat messages may hold only JSON values (str, numbers, bool, None, lists, dicts), "
                    f"got {type(value).__name__}")


def _check_messages(messages: object) -> list[dict]:
    """Validate and copy ``messages``: a non-empty list of dicts, each with a str ``role``.

    Keys whose value is None are dropped, as ``transformers`` does (templates test for a
    missing key, not for None).
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: a chat needs at least one message")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        if not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}] has no 'role' string (got keys {sorted(map(str, message))})")
        out.append(_plain({k: v for k, v in message.items() if v is not None}, f"messages[{i}]"))
    return out


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    special_tokens: Mapping[str, str] | None = None,
    return_generation_spans: bool = False,
    **kwargs: Any,
) -> str | tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` with the Jinja2 chat ``template`` (source text).

    The template sees ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the
    ``special_tokens`` (``{"bos_token": "<s>", ...}``) and ``kwargs`` (which override them).
    With ``return_generation_spans=True`` also returns the ``[start, end)`` character spans of
    the template's ``{% generation %}`` blocks in the rendered text (an empty list when the
    template has none).

    Raises ChatTemplateError when the template calls ``raise_exception`` or fails while
    rendering (the message says which), TypeError/ValueError for malformed ``messages``.
    """
    chat = _check_messages(messages)
    if documents is not None and not all(isinstance(d, Mapping) for d in documents):
        raise TypeError("documents must be a list of dicts (e.g. {'title': ..., 'text': ...})")
    variables = {**dict(special_tokens or {}), **_plain(kwargs, "chat template argument")}
    compiled = compile_chat_template(template)
    reset = _tracking.set(return_generation_spans)
    try:
        text = compiled.render(messages=chat, tools=_plain(tools, "tools"), documents=_plain(documents, "documents"),
                               add_generation_prompt=bool(add_generation_prompt), **variables)
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"chat template tried an unsafe operation: {e}") from e
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template refused the messages: {e}") from e
    finally:
        _tracking.reset(reset)
    if not return_generation_spans:
        return text
    return _strip_generation_markers(text)


def _strip_generation_markers(marked: str) -> tuple[str, list[tuple[int, int]]]:
    parts, spans, pos, start = [], [], 0, None
    length = 0
    for i, ch in enumerate(marked):
        if ch not in (_GEN_START, _GEN_END):
            continue
        parts.append(marked[pos:i])
        length += i - pos
        pos = i + 1
        if ch == _GEN_START:
            if start is not None:
                raise ChatTemplateError("chat template nests {% generation %} blocks")
            start = length
        else:
            spans.append((start, length))
            start = None
    parts.append(marked[pos:])
    return "".join(parts), spans


# --------------------------------------------------------------------------- files


def read_chat_templates(directory: Path, tokenizer_config: Mapping[str, Any]) -> str | dict[str, str] | None:
    """The chat template(s) of a checkpoint directory: one string, ``{name: source}`` or None."""
    templates: dict[str, str] = {}
    main_file = directory / CHAT_TEMPLATE_FILE
    if main_file.is_file():
        templates["default"] = main_file.read_text(encoding="utf-8")
    extra_dir = directory / CHAT_TEMPLATE_DIR
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.stem] = path.read_text(encoding="utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    return parse_chat_template_entry(tokenizer_config.get("chat_template"), directory / "tokenizer_config.json")


def parse_chat_template_entry(entry: Any, source: object) -> str | dict[str, str] | None:
    """A ``chat_template`` config entry: None, a template string, or a list of
    ``{"name": str, "template": str}`` (returned as ``{name: template}``)."""
    if entry is None or isinstance(entry, str):
        return entry
    if isinstance(entry, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in entry.items()):
        return dict(entry)
    if isinstance(entry, list) and all(isinstance(t, Mapping) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in entry):
        return {t["name"]: t["template"] for t in entry}
    raise ValueError(f"{source}: 'chat_template' must be a string or a list of "
                     f"{{'name': str, 'template': str}} entries, got {type(entry).__name__}")


def select_chat_template(templates: str | Mapping[str, str] | None, name: str | None = None,
                         tools: list | None = None) -> str:
    """Pick the template source to render (``transformers``' rules).

    ``name`` may be the name of one of several templates or a template source itself; with
    several templates and no name, ``"tool_use"`` is taken when ``tools`` are given, else
    ``"default"``. Raises ValueError when there is no template or no default.
    """
    if isinstance(templates, Mapping):
        if name is not None:
            return templates.get(name, name)
        if tools is not None and "tool_use" in templates:
            return templates["tool_use"]
        if "default" in templates:
            return templates["default"]
        raise ValueError(f"the tokenizer has several chat templates ({', '.join(sorted(templates))}) and none is "
                         "named 'default': pass chat_template=<name>")
    if name is not None:
        return name
    if templates is None:
        raise ValueError("the tokenizer has no chat template (no chat_template.jinja and no 'chat_template' in "
                         "tokenizer_config.json); pass chat_template=<Jinja source> or use a plain prompt")
    return templates
