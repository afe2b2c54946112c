"""Chat templates rendered the way Hugging Face transformers renders them.

Models ship their prompt format as a Jinja template (tokenizer_config.json "chat_template" or
GGUF "tokenizer.chat_template"). Rendering it with exactly transformers' environment (sandbox,
trim_blocks/lstrip_blocks, loop controls, `raise_exception`, a non-HTML-escaping `tojson`,
`strftime_now`, the `{% generation %}` tag) is what makes our prompts byte-identical to the
ones the model was trained and evaluated with.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["DEFAULT_CHATML", "ChatTemplateError", "render_chat"]

# ChatML, the format transformers used for models without a template of their own.
DEFAULT_CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Names a message's reasoning may come under; templates read "reasoning_content" or "thinking".
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """A chat template that does not compile, or that fails (or raises) while rendering."""


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in
    transformers; for rendering it just outputs its body."""

    tags = {"generation"}  # noqa: RUF012 - jinja's Extension API declares it this way

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes ("<" -> "\u003c"); transformers' does not.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` inside templates, without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore attributes (no reaching CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # jinja's signature trick, kept
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"namespace attributes may not start with '_': {name!r}")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@functools.lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template syntax error at line {exc.lineno}: "
                                f"{_one_line(exc.message or '')}") from None


def _plain(value: Any) -> Any:
    """A deep copy in plain JSON-like types (as transformers makes), so the template never
    mutates or reaches into the caller's objects; pydantic models and dataclasses become
    dicts, anything else unknown a "<TypeName>" placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic, e.g. the server's messages
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _prepare(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """transformers' message clean-up: drop None-valued keys, alias the reasoning fields."""
    out = []
    for k, message in enumerate(messages):
        plain = _plain(message)
        if not isinstance(plain, dict):
            raise ChatTemplateError(f"messages[{k}] must be a mapping with 'role' and "
                                    f"'content', got {type(message).__name__}")
        msg = {key: v for key, v in plain.items() if v is not None}
        reasoning = next((msg[f] for f in _REASONING_FIELDS if msg.get(f) is not None), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        out.append(msg)
    return out


def render_chat(template: str, messages: list[dict[str, Any]], *,
                add_generation_prompt: bool = True, bos_token: str = "", eos_token: str = "",
                **extra: Any) -> str:
    """Render `messages` with a model's chat template, as transformers'
    `apply_chat_template(..., tokenize=False)` does.

    `extra` reaches the template as variables too (`tools`, `documents`, `date_string`,
    `enable_thinking`, other special tokens...). Raises `ChatTemplateError` with a one-line
    message when the template does not compile, calls `raise_exception`, or fails.
    """
    if not isinstance(template, str):
        raise ChatTemplateError(f"chat template must be a string, got {type(template).__name__}")
    compiled = _compile(template)
    context = {"bos_token": bos_token, "eos_token": eos_token, **_plain(extra)}
    context.setdefault("tools", None)
    context.setdefault("documents", None)
    try:
        return compiled.render(messages=_prepare(messages),
                               add_generation_prompt=add_generation_prompt, **context)
    except jinja2.TemplateError as exc:
        kind = "raised" if type(exc) is jinja2.TemplateError else "failed"
        raise ChatTemplateError(f"chat template {kind}: {_one_line(exc.message or '')}") \
            from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError,
            OverflowError, RecursionError) as exc:
        raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: "
                                f"{_one_line(str(exc))}") from None
