"""runtime.chat.render_chat against transformers' apply_chat_template(..., tokenize=False).

The reference is a real `PreTrainedTokenizerFast` (built around a tiny in-memory tokenizer)
with the template and bos/eos tokens set, so every comparison goes through transformers' own
Jinja environment and message clean-up.
"""

from __future__ import annotations

from typing import Any

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from runtime.chat import DEFAULT_CHATML, ChatTemplateError, render_chat

pytestmark = pytest.mark.unit

BOS, EOS = "<|begin_of_text|>", "<|eot_id|>"

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

# Qwen2.5-style ChatML: default system prompt, tools as JSON, tool calls and tool results.
QWEN2 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or
          (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Mistral-style: alternation enforced with raise_exception; loop controls, namespace,
# reasoning fields, {% generation %}, dict(), strftime_now and indented blocks (lstrip/trim).
STRICT = "\n".join([
    "{{ bos_token }}",
    "{% set ns = namespace(count=0, system='') %}",
    "{% for message in messages %}",
    "    {% if message['role'] == 'system' %}",
    "        {% set ns.system = message['content'] %}",
    "        {% continue %}",
    "    {% endif %}",
    "    {% if (message['role'] == 'user') != (ns.count % 2 == 0) %}",
    "        {{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}",
    "    {% endif %}",
    "    {% set ns.count = ns.count + 1 %}",
    "    {% if message['role'] == 'user' %}",
    "        [INST] {% if ns.system and ns.count == 1 %}{{ ns.system }}\\n\\n{% endif %}"
    "{{ message['content'] }} [/INST]",
    "    {% else %}",
    "        {% generation %}{% if message.thinking is defined %}<think>{{ message.thinking }}"
    "</think>{% endif %}{{ message['content'] }}{% endgeneration %}{{ eos_token }}",
    "    {% endif %}",
    "    {% if message.get('stop') %}{% break %}{% endif %}",
    "{% endfor %}",
    "{% set meta = dict(year=strftime_now('%Y'), n=ns.count) %}",
    "{{ meta | tojson }}{% if tool_calls is defined %}{{ tool_calls }}{% endif %}",
    "",
])

CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "Tu es un assistant. Réponds en français 🇫🇷."},
    {"role": "user", "content": "  Bonjour! Quel temps fait-il à Zürich?  \n"},
    {"role": "assistant", "content": "Il fait beau ☀️ <b>25°C</b>."},
    {"role": "user", "content": "Et demain?\n\tMerci."},
]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Météo d'une ville <city>",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]

TOOL_CONVERSATION: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather",
                                          "arguments": {"city": "Zürich", "unit": "°C"}}}]},
    {"role": "tool", "content": '{"temp": 25}'},
    {"role": "tool", "content": '{"wind": "calm"}'},
    {"role": "assistant", "content": "25°C and calm.", "tool_calls": None},
    {"role": "user", "content": "Thanks"},
]


def reference(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool,
              **extra: Any) -> str:
    tok = Tokenizer(models.BPE())
    tok.add_special_tokens([BOS, EOS])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)
    hf.chat_template = template
    return hf.apply_chat_template(messages, tokenize=False,
                                  add_generation_prompt=add_generation_prompt, **extra)


def ours(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool,
         **extra: Any) -> str:
    return render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                       bos_token=BOS, eos_token=EOS, **extra)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize(("template", "messages", "extra"), [
    (LLAMA3, CONVERSATION, {}),
    (QWEN2, CONVERSATION, {}),
    (QWEN2, CONVERSATION[1:], {}),
    (QWEN2, TOOL_CONVERSATION, {"tools": TOOLS}),
    (DEFAULT_CHATML, CONVERSATION, {}),
    (STRICT, CONVERSATION, {}),
    (STRICT, [*CONVERSATION[:3], {"role": "user", "content": "stop", "stop": True},
              {"role": "user", "content": "never rendered"}], {}),
    (STRICT, [{"role": "user", "content": "why?"},
              {"role": "assistant", "content": "because", "reasoning_content": "hmm…"}], {}),
], ids=["llama3", "qwen2", "qwen2-default-system", "qwen2-tools", "chatml", "strict",
        "strict-break", "strict-reasoning"])
def test_render_equals_transformers(template: str, messages: list[dict[str, Any]],
                                    extra: dict[str, Any], add_generation_prompt: bool) -> None:
    want = reference(template, messages, add_generation_prompt=add_generation_prompt, **extra)
    got = ours(template, messages, add_generation_prompt=add_generation_prompt, **extra)
    assert got == want


def test_default_generation_prompt_is_on() -> None:
    text = render_chat(DEFAULT_CHATML, [{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_messages_are_not_modified() -> None:
    messages = [{"role": "user", "content": "x", "extra": None},
                {"role": "assistant", "content": "y", "reasoning": "r"}]
    before = [dict(m) for m in messages]
    render_chat("{% for m in messages %}{{ m | tojson }}{% endfor %}", messages)
    assert messages == before


def test_raise_exception_is_a_chat_template_error() -> None:
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="roles must alternate"):
        reference(STRICT, bad, add_generation_prompt=True)
    with pytest.raises(ChatTemplateError, match=r"^chat template raised: Conversation roles "
                                                r"must alternate") as info:
        ours(STRICT, bad, add_generation_prompt=True)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("template", "message"), [
    ("{% for m in messages %}{{ m.content }", r"^chat template syntax error at line 1: "),
    ("{% if x %}\n\nno end", r"^chat template syntax error at line 2: .*endif"),
    ("{{ messages[0].content.nope() }}", r"^chat template failed: "),
    ("{{ 1 // 0 }}", r"^chat template failed: ZeroDivisionError"),
    ("{{ messages.__class__.__mro__ }}", r"^chat template failed: "),
    ("{% set ns = namespace(_x=1) %}", r"^chat template failed: .*'_x'"),
])
def test_bad_templates_are_chat_template_errors(template: str, message: str) -> None:
    with pytest.raises(ChatTemplateError, match=message) as info:
        render_chat(template, [{"role": "user", "content": "hi"}])
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_a_missing_template_is_a_chat_template_error() -> None:
    with pytest.raises(ChatTemplateError, match="must be a string, got NoneType"):
        render_chat(None, [{"role": "user", "content": "hi"}])  # type: ignore[arg-type]


def test_tojson_does_not_escape_html_or_unicode() -> None:
    text = render_chat("{{ x | tojson }}|{{ x | tojson(indent=2) }}", [],
                       x={"a": "<b>é</b>", "n": [1, 2]})
    assert text == ('{"a": "<b>é</b>", "n": [1, 2]}|'
                    '{\n  "a": "<b>é</b>",\n  "n": [\n    1,\n    2\n  ]\n}')


def test_pydantic_messages_render_like_dicts() -> None:
    from pydantic import BaseModel

    class Message(BaseModel):
        role: str
        content: str | None = None
        name: str | None = None

    template = ("{% for m in messages %}{{ m.role }}|{{ m.content }}|"
                "{{ m.name is defined }};{% endfor %}")
    as_models = [Message(role="user", content="hi"), Message(role="assistant", content="yo")]
    as_dicts = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    got = render_chat(template, as_models)  # type: ignore[arg-type]
    assert got == render_chat(template, as_dicts) == "user|hi|False;assistant|yo|False;"
