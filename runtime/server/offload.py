"""Sending a request to the remote (cloud) endpoint: any OpenAI-compatible server.

The remote is always asked for a stream, whatever the client asked for, so that text can be
passed on as it comes and, when the remote breaks halfway, the text already received is known
exactly: the local model then continues from there and the client sees one coherent answer.
Failures before the first piece of text (refused connection, timeout, 5xx, malformed reply)
are retried with exponential backoff; after `retries` the caller falls back to local work.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

log = logging.getLogger("claw.serve.offload")

# Request fields that are ours or llama.cpp's, not OpenAI's: OpenAI itself rejects unknown
# fields, so they are not forwarded.
EXTENSIONS = frozenset({"priority", "top_k", "min_p", "repetition_penalty"})


class RemoteFailed(Exception):
    """The remote did not finish. `text` is what it had sent (may be empty)."""

    def __init__(self, reason: str, text: str = ""):
        super().__init__(reason)
        self.reason, self.text = reason, text


@dataclass
class RemoteEnd:
    finish_reason: str
    usage: dict[str, Any] | None


class RemoteClient:
    def __init__(self, url: str, *, model: str | None, api_key: str | None, timeout_s: float,
                 retries: int, backoff_s: float):
        self.url = url.rstrip("/")
        self.model, self.retries, self.backoff_s = model, retries, backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout_s))
        self.inflight = 0

    async def close(self) -> None:
        await self.client.aclose()

    async def stream(self, endpoint: str, body: dict[str, Any]) -> AsyncIterator[str | RemoteEnd]:
        """Yield text pieces, then one RemoteEnd. Raises RemoteFailed (with the text sent so
        far) when the remote cannot be reached or breaks off."""
        body = {k: v for k, v in body.items() if k not in EXTENSIONS}
        body.update(stream=True, stream_options={"include_usage": True})
        if self.model:
            body["model"] = self.model
        attempt, text = 0, ""
        while True:
            try:
                async for item in self._once(endpoint, body):
                    if isinstance(item, str):
                        text += item
                    yield item
                return
            except (httpx.HTTPError, RemoteFailed, ValueError, KeyError, TypeError) as exc:
                reason = exc.reason if isinstance(exc, RemoteFailed) else \
                    f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if text or attempt >= self.retries:
                    raise RemoteFailed(reason, text) from None
                delay = self.backoff_s * 2 ** attempt
                attempt += 1
                log.warning("remote %s failed (%s); retry %d/%d in %.2f s", endpoint, reason,
                            attempt, self.retries, delay)
                await asyncio.sleep(delay)

    async def _once(self, endpoint: str, body: dict[str, Any]) -> AsyncIterator[str | RemoteEnd]:
        chat = endpoint == "chat/completions"
        async with self.client.stream("POST", f"{self.url}/{endpoint}", json=body) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread())[:200].decode("utf-8", "replace")
                raise RemoteFailed(f"HTTP {resp.status_code}: {detail}")
            finish, usage = None, None
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    if finish is None:
                        raise RemoteFailed("stream ended without a finish_reason")
                    yield RemoteEnd(finish, usage)
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RemoteFailed(f"error event: {chunk['error']}")
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    piece = choice["delta"].get("content") if chat else choice.get("text")
                    if piece:
                        yield piece
                    finish = choice.get("finish_reason") or finish
            raise RemoteFailed("connection closed before [DONE]")
