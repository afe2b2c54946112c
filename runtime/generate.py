"""Turning a prompt into text: chunked prefill, then one token at a time until a stop.

`Generation` is an iterator of text pieces, so callers (the CLI, the HTTP server's streaming
responses) print words as they are made. Text is held back only while it could still become
a stop string, or while a UTF-8 character is incomplete; a stop string itself is never shown.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from runtime.backends import Backend, KVCache
from runtime.sampling import Sampler, SamplingParams


@dataclass
class GenerationResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""  # "stop" (end token or stop string) or "length"
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def stats(self) -> dict[str, Any]:
        decode_tps = (self.completion_tokens - 1) / self.decode_seconds \
            if self.decode_seconds > 0 and self.completion_tokens > 1 else None
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
            "prefill_tokens_per_s": self.prompt_tokens / self.prefill_seconds
            if self.prefill_seconds > 0 else None,
            "decode_tokens_per_s": decode_tps,
        }


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that could be the start of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class Generation:
    """Iterate for text pieces; `result` holds the whole outcome once iteration ends.

    The same sequence can be driven one token at a time from outside (`start`, then `step`
    with each new row of logits), which is how the server decodes several sequences in one
    batched forward pass; iterating runs exactly those steps with a forward pass per token.
    """

    def __init__(self, backend: Backend, tokenizer: Any, prompt_ids: Sequence[int],
                 params: SamplingParams, cache: KVCache, prefill_chunk: int = 256):
        self.backend, self.tokenizer, self.params = backend, tokenizer, params
        self.prompt_ids, self.cache, self.prefill_chunk = list(prompt_ids), cache, prefill_chunk
        self.result = GenerationResult(prompt_tokens=len(self.prompt_ids))
        self.done = False
        self.next_token: int | None = None  # the token the next forward pass must run

    def prefill(self) -> Any:
        start = time.perf_counter()
        logits = None
        for i in range(0, len(self.prompt_ids), self.prefill_chunk):
            logits = self.backend.forward(self.prompt_ids[i:i + self.prefill_chunk], self.cache)
        self.result.prefill_seconds = time.perf_counter() - start
        return logits[-1]

    def start(self) -> Any:
        """Prefill the prompt; return the logits the first `step` samples from."""
        from runtime.tokenizer import StreamDecoder

        self._sampler = Sampler(self.params)
        self._decoder = StreamDecoder(self.tokenizer)
        self._history = list(self.prompt_ids)
        self._text, self._shown = "", 0
        logits = self.prefill()
        self._decode_start = time.perf_counter()
        self.result.finish_reason = "length"
        return logits

    def step(self, logits: Any) -> str:
        """Sample one token from `logits`; return the text that became safe to show. Sets
        `done` when the sequence has ended, else `next_token` for the next forward pass."""
        p, res = self.params, self.result
        token = self._sampler(logits, self._history)
        if token in self.tokenizer.eot_ids:
            res.finish_reason = "stop"
            return self._finish()
        res.token_ids.append(token)
        self._history.append(token)
        self._text += self._decoder.feed(token)
        text, shown = self._text, self._shown
        hit = min((i for i in (text.find(s, max(0, shown - len(s))) for s in p.stop)
                  if i >= 0), default=-1)
        if hit >= 0:
            self._text, res.finish_reason = text[:hit], "stop"
            return self._finish()
        piece = ""
        safe = len(text) - _held_back(text, p.stop)
        if safe > shown:
            piece, self._shown = text[shown:safe], safe
        if len(res.token_ids) >= p.max_tokens or self.cache.length >= self.cache.n_ctx:
            return piece + self._finish()
        self.next_token = token
        return piece

    def _finish(self) -> str:
        res = self.result
        if res.finish_reason == "length":
            self._text += self._decoder.flush()
        rest = self._text[self._shown:]
        self._shown = len(self._text)
        res.text = self._text
        res.decode_seconds = time.perf_counter() - self._decode_start
        self.done, self.next_token = True, None
        return rest

    def __iter__(self) -> Iterator[str]:
        logits = self.start()
        while True:
            piece = self.step(logits)
            if piece:
                yield piece
            if self.done:
                return
            logits = self.backend.forward([self.next_token], self.cache)[-1]
