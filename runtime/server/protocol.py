"""The OpenAI wire format: request bodies as pydantic models, and the error objects, response
bodies and server-sent-event chunks in exactly the shape OpenAI's clients parse.

Request fields are checked strictly ("5" is not a number, as with OpenAI); fields OpenAI
defines that we do not act on (user, logit_bias, …) are accepted and ignored, as clients send
them. `priority` is ours: critical, normal or background.
"""

from __future__ import annotations

import json
import re
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Priority = Literal["critical", "normal", "background"]


class APIError(Exception):
    """An OpenAI-style error: HTTP status, message, type, param and code."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.retry_after = param, code, retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after else {}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class CommonRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # llama.cpp's extensions, as its server accepts them
    min_p: float = Field(0.0, ge=0, lt=1)
    repetition_penalty: float = Field(1.0, gt=0)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    priority: Priority | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """OpenAI treats `"temperature": null` as "not given"; so do we."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) \
            else data

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop or [] if s]


class CompletionRequest(CommonRequest):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] | \
        Annotated[list[int], Field(min_length=1)]

    def prompt_value(self) -> str | list[int]:
        p = self.prompt
        return p[0] if isinstance(p, list) and isinstance(p[0], str) else p  # type: ignore


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)



# Union members pydantic adds to an error's location ("str", "list[int]", "TextPart", …).
_TYPE_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|literal\[.*\]|"
                       r"function-.*|[A-Z]\w*)$")


def parse(model: type[BaseModel], raw: bytes) -> Any:
    """Body bytes → a request model, or an APIError naming the offending parameter."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"We could not parse the JSON body of your request ({exc}). "
                       "(expected a JSON object)") from None
    if not isinstance(data, dict):
        raise APIError(400, f"The request body is a JSON {type(data).__name__} "
                       "(expected a JSON object)")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"] if not _TYPE_TAG.match(str(p))]
        param = ".".join(loc) or None
        if err["type"] == "missing":
            message = f"Missing required parameter: '{param}'."
        else:
            shown = json.dumps(err.get("input"))[:80]
            message = f"Invalid value for '{param}': {shown}. {err['msg']}."
        return _raise(APIError(400, message, param=param,
                               code="missing_required_parameter" if err["type"] == "missing"
                               else "invalid_value"))


def _raise(exc: Exception) -> Any:
    raise exc


# ---- responses ----------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(kind: str, rid: str, model: str, text: str, finish: str,
                    use: dict[str, int]) -> dict[str, Any]:
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model,
            "choices": [choice], "usage": use}


def chunk(kind: str, rid: str, model: str, *, text: str | None = None,
          finish: str | None = None, first: bool = False,
          use: dict[str, int] | None = None) -> str:
    """One `data: …` event. A usage-only chunk has no choices, as OpenAI sends it."""
    if kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if text is not None:
            delta["content"] = text
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        obj = "chat.completion.chunk"
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
        obj = "text_completion"
    body: dict[str, Any] = {"id": rid, "object": obj, "created": int(time.time()),
                            "model": model, "choices": [] if use is not None else choices}
    if use is not None:
        body["usage"] = use
    return f"data: {sse_json(body)}\n\n"


# Characters that JSON leaves raw (with ensure_ascii off) but that Python's str.splitlines, and
# so httpx's line reader, treat as line ends: a token decoding to one split its event in two.
_LINE_ENDS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_json(body: Any) -> str:
    """JSON for one SSE data line: UTF-8 text as it is, except the characters that line
    readers split on, escaped (JSON's own escaping already covers \\n, \\r and the rest
    below U+0020; these can only occur inside strings, so the escape is exact)."""
    return json.dumps(body, ensure_ascii=False).translate(_LINE_ENDS)


def error_event(err: APIError) -> str:
    return f"data: {json.dumps(err.body())}\n\n"


DONE = "data: [DONE]\n\n"
