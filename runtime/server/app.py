"""The HTTP server: OpenAI's /v1 API, /health and /metrics, on FastAPI.

Every inference request takes the same path: parse and check it (OpenAI-style 400s), pick a
priority (body `priority`, else header `X-Priority`, else normal), then route it:

- critical work always runs locally;
- normal and background work goes to the remote endpoint while the device is under memory
  pressure (or while the local model is not loaded), if offload is configured;
- whatever the remote fails to finish comes back to the local queue, continuing from the text
  already sent, so a streaming client sees one coherent answer.

Every decision is logged and counted (`claw_offload_decisions`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.sampling import SamplingParams
from runtime.server import protocol as wire
from runtime.server.config import ServeConfig
from runtime.server.metrics import Metrics
from runtime.server.monitor import PressureMonitor, thresholds_for
from runtime.server.offload import RemoteClient, RemoteEnd, RemoteFailed
from runtime.server.protocol import APIError
from runtime.server.scheduler import Done, Failed, Job, Refused, Scheduler

log = logging.getLogger("claw.serve")


@dataclass
class End:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Prepared:
    """A checked request, ready to route."""

    kind: str  # "chat" or "completion"
    endpoint: str  # "chat/completions" or "completions"
    body: dict[str, Any]  # the client's JSON, forwarded to the remote as is
    priority: str
    stream: bool
    include_usage: bool
    prompt: str | list[int]  # text (the chat template already applied) or token ids
    add_bos: bool | None
    prompt_ids: list[int] | None  # None while the local model is not loaded
    params: SamplingParams
    jobs: list[Job] = field(default_factory=list)
    fell_back: bool = False  # offloaded, then finished locally after the remote failed


class Server:
    """State shared by the handlers: the model (loaded on a thread), the scheduler, the
    pressure monitor and the remote client."""

    def __init__(self, config: ServeConfig, api_key: str | None):
        self.config, self.api_key = config, api_key
        self.name = config.served_name()
        self.metrics = Metrics()
        self.model: Any = None
        self.load_error: str | None = None
        self.scheduler: Scheduler | None = None
        self.remote: RemoteClient | None = None
        self.created = int(time.time())
        m = config.monitor
        self.monitor = PressureMonitor(thresholds_for(m), m.interval_s, m.inject_file,
                                       gpu_memory=self._gpu_memory, on_change=self._pressure)

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        off = self.config.offload
        if off.enabled and off.url:
            self.remote = RemoteClient(off.url, model=off.model, api_key=off.api_key(),
                                       timeout_s=off.timeout_s, retries=off.retries,
                                       backoff_s=off.backoff_s)
        self.monitor.start()
        threading.Thread(target=self._load, name="claw-load", daemon=True).start()

    def _load(self) -> None:
        from runtime.api import Model

        cfg = self.config
        if cfg.model is None:
            self.load_error = "no model configured (expected MODEL or `model:` in the config)"
            log.error("not serving locally: %s", self.load_error)
            return
        try:
            model = Model(cfg.model, backend=cfg.backend, n_ctx=cfg.context,
                          memory_budget=cfg.memory_budget, sequences=cfg.scheduler.max_batch)
            if model.tokenizer is None:
                raise ValueError(f"{cfg.model} has no tokenizer (expected one in the model)")
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("the local model failed to load: %s", self.load_error)
            return
        s = cfg.scheduler
        scheduler = Scheduler(model, max_batch=s.max_batch, max_queue=s.max_queue,
                              background_queue=s.background_queue or 1,
                              critical_reserve=s.critical_reserve,
                              retry_after_s=s.retry_after_s, on_step=self._stepped,
                              on_preempt=self._preempted)
        scheduler.start()
        self.model, self.scheduler = model, scheduler
        self.metrics.model_loaded.set(1)
        log.info("model %s loaded (%s backend: %s)", cfg.model, model.backend.name,
                 model.backend_reason)
        if cfg.memory_budget is not None:
            log.info("%s", model.plan.summary())

    async def stop(self) -> None:
        self.monitor.stop()
        if self.scheduler:
            await asyncio.to_thread(self.scheduler.stop)
        if self.remote:
            await self.remote.close()

    def _gpu_memory(self) -> tuple[int, int] | None:
        """(used, total) device memory, from backends that hold some (OpenCL)."""
        return self.model.backend.memory_in_use() if self.model is not None else None

    def _pressure(self, pressure: bool, reasons: list[str]) -> None:
        self.metrics.pressure.set(int(pressure))
        self.metrics.pressure_changes.inc()

    def _preempted(self, priority: str) -> None:
        self.metrics.preempted.labels(priority).inc()

    def _stepped(self, rows: int) -> None:
        self.metrics.decode_steps.inc()
        self.metrics.decode_rows.inc(rows)

    # ---- checks -------------------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise APIError(401, "You didn't provide an API key. You need to provide your API "
                           "key in an Authorization header using Bearer auth (i.e. "
                           "Authorization: Bearer YOUR_KEY).", code="invalid_api_key")
        if not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def prepare(self, kind: str, req: Any, header_priority: str | None,
                raw: dict[str, Any]) -> Prepared:
        if req.model != self.name:
            raise APIError(404, f"The model '{req.model}' does not exist (expected "
                           f"'{self.name}')", param="model", code="model_not_found")
        priority = req.priority or (header_priority or "normal").lower()
        if priority not in ("critical", "normal", "background"):
            raise APIError(400, f"Invalid value for header 'X-Priority': '{priority}' "
                           "(expected critical, normal or background)", param="priority")
        s = self.config.scheduler
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if max_tokens is not None and max_tokens > s.max_tokens_limit:
            raise APIError(400, f"max_tokens is too large: {max_tokens}. This server allows "
                           f"at most {s.max_tokens_limit} completion tokens.",
                           param="max_tokens", code="invalid_value")
        model = self.model
        add_bos: bool | None = None
        if kind == "chat":
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            if model is None:
                prompt: str | list[int] = ""
            else:
                try:
                    prompt = model.chat_prompt(messages)
                except Exception as exc:
                    raise APIError(400, f"The messages cannot be rendered with the model's "
                                   f"chat template: {exc}", param="messages") from None
                tok = model.tokenizer
                if tok.bos_id is not None and prompt.startswith(tok.token_text(tok.bos_id)):
                    add_bos = False
        else:
            prompt = req.prompt_value()
        prompt_ids = None
        if model is not None:
            prompt_ids = model.tokenize(prompt, add_bos=add_bos) if isinstance(prompt, str) \
                else list(prompt)
            vocab = model.config.vocab_size
            if any(not 0 <= t < vocab for t in prompt_ids):
                raise APIError(400, f"The prompt has a token id outside 0…{vocab - 1}.",
                               param="prompt", code="invalid_value")
            if not prompt_ids:
                raise APIError(400, "The prompt is empty (expected at least one token).",
                               param="prompt")
            room = model.n_ctx - len(prompt_ids)
            if room < 1 or (max_tokens is not None and max_tokens > room):
                asked = len(prompt_ids) + (max_tokens or 1)
                raise APIError(400, f"This model's maximum context length is {model.n_ctx} "
                               f"tokens. However, you requested {asked} tokens "
                               f"({len(prompt_ids)} in the prompt, {max_tokens or 1} for the "
                               "completion). Please reduce the prompt or max_tokens.",
                               param="messages" if kind == "chat" else "prompt",
                               code="context_length_exceeded")
            max_tokens = max_tokens or min(s.default_max_tokens, room)
        params = SamplingParams(
            temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
            seed=None if req.seed is None else req.seed % 2**64,
            max_tokens=max_tokens or s.default_max_tokens, stop=req.stops())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return Prepared(kind, "chat/completions" if kind == "chat" else "completions", raw,
                        priority, req.stream, include_usage, prompt, add_bos, prompt_ids, params)

    # ---- routing ------------------------------------------------------------------------

    def decide(self, p: Prepared) -> tuple[str, str]:
        """("local" or "offload", why)."""
        if p.priority == "critical":
            return "local", "critical stays local"
        remote = self.remote
        if remote is None:
            return "local", "offload not configured"
        if self.model is None:
            return "offload", "local model not loaded"
        if not self.monitor.under_pressure:
            return "local", "no memory pressure"
        if remote.inflight >= self.config.offload.max_inflight:
            return "local", "remote at max_inflight"
        return "offload", "memory pressure: " + "; ".join(self.monitor.reasons)

    def unavailable(self, why: str) -> APIError:
        state = f"the local model failed to load ({self.load_error})" if self.load_error \
            else "the local model is still loading"
        return APIError(503, f"{why}: {state}.", type="server_error",
                        code="model_not_loaded", retry_after=self.config.scheduler.retry_after_s)

    def begin(self, p: Prepared) -> tuple[str, AsyncIterator[str | End]]:
        """Route `p`; refusals (429/503) are raised here, before any response has started.
        The jobs the answer uses are recorded in `p.jobs`, so that a client that goes away
        cancels them at once, without awaiting anything (its task is being cancelled)."""
        route, reason = self.decide(p)
        self.metrics.decisions.labels(route, reason.split(":")[0]).inc()
        log.info("%s %s request → %s (%s)", p.priority, p.endpoint, route, reason)
        if route == "offload":
            return route, self._offloaded(p)
        if self.model is None:
            raise self.unavailable(f"{p.priority} work is served only locally")
        job = self._submit(p, p.prompt_ids or [], p.params, force=False)
        p.jobs.append(job)
        return route, self._local(job, len(p.prompt_ids or []), 0)

    def _submit(self, p: Prepared, ids: list[int], params: SamplingParams, force: bool) -> Job:
        job = Job(p.priority, ids, params, asyncio.get_running_loop())
        assert self.scheduler is not None
        try:
            self.scheduler.submit(job, force=force)
        except Refused as exc:
            raise APIError(exc.status, str(exc), type="server_error" if exc.status == 503
                           else "rate_limit_exceeded", code="queue_full",
                           retry_after=exc.retry_after) from None
        return job

    async def _local(self, job: Job, prompt_tokens: int, already: int) -> AsyncIterator[str | End]:
        """The job's pieces, then End; the job is cancelled if the consumer goes away."""
        finished = False
        try:
            while True:
                item = await job.out.get()
                if isinstance(item, str):
                    yield item
                elif isinstance(item, Done):
                    finished = True
                    if job.started_at:
                        self.metrics.queue_wait.labels(job.priority).observe(
                            job.started_at - job.enqueued_at)
                    yield End(item.result.finish_reason, prompt_tokens,
                              already + item.result.completion_tokens)
                    return
                elif isinstance(item, Failed):
                    finished = True
                    raise APIError(500, f"The local model failed: {item.error}",
                                   type="server_error", code="local_failure")
        finally:
            if not finished and self.scheduler:
                self.scheduler.cancel(job)

    async def _offloaded(self, p: Prepared) -> AsyncIterator[str | End]:
        assert self.remote is not None
        remote = self.remote
        remote.inflight += 1
        self.metrics.offload_inflight.inc()
        try:
            async for item in remote.stream(p.endpoint, p.body):
                if isinstance(item, RemoteEnd):
                    use = item.usage or {}
                    yield End(item.finish_reason, use.get("prompt_tokens", 0),
                              use.get("completion_tokens", 0))
                    return
                yield item
            return
        except RemoteFailed as exc:
            failure = exc
        finally:
            remote.inflight -= 1
            self.metrics.offload_inflight.dec()
        p.fell_back = True
        self.metrics.decisions.labels("fallback", "remote failed").inc()
        log.warning("remote failed after %d chars (%s) → local", len(failure.text),
                    failure.reason)
        if self.model is None:
            raise self.unavailable("the remote failed and local fallback is impossible")
        if p.prompt_ids is None:  # prepared before the model was loaded: check it now
            fresh = self.prepare_again(p)
            p.prompt, p.add_bos, p.prompt_ids, p.params = \
                fresh.prompt, fresh.add_bos, fresh.prompt_ids, fresh.params
        ids, params, done = list(p.prompt_ids or []), p.params, 0
        if failure.text:  # continue the answer where the remote left it
            ids = self.model.tokenize(p.prompt + failure.text, add_bos=p.add_bos) \
                if isinstance(p.prompt, str) else ids + self.model.tokenize(
                    failure.text, add_bos=False)
            done = len(self.model.tokenize(failure.text, add_bos=False))
            left = min(p.params.max_tokens - done, self.model.n_ctx - len(ids))
            if left < 1:
                yield End("length", len(p.prompt_ids or []), done)
                return
            params = dataclasses.replace(p.params, max_tokens=left)
        job = self._submit(p, ids, params, force=True)
        p.jobs.append(job)
        async for item in self._local(job, len(p.prompt_ids or []), done):
            yield item

    def prepare_again(self, p: Prepared) -> Prepared:
        cls = wire.ChatRequest if p.kind == "chat" else wire.CompletionRequest
        return self.prepare(p.kind, cls.model_validate(p.body), p.priority, p.body)


def create_app(config: ServeConfig, api_key: str | None = None) -> FastAPI:
    server = Server(config, api_key)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.start()
        yield
        await server.stop()

    app = FastAPI(title="ClawForge runtime", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(exc.status_code, str(exc.detail), code="not_found"
                       if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        err = APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        s = server
        body: dict[str, Any] = {"model": s.name, "pressure": s.monitor.under_pressure,
                                "offload": s.remote is not None}
        if s.model is not None:
            return JSONResponse({"status": "ok", **body})
        if s.load_error:
            return JSONResponse({"status": "error", "error": s.load_error, **body}, 503)
        return JSONResponse({"status": "loading", **body}, 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        data = server.metrics.render(server.scheduler, server.monitor.reading)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict[str, Any]:
        return {"id": server.name, "object": "model", "created": server.created,
                "owned_by": "clawforge"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        server.authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str, request: Request) -> dict[str, Any]:
        server.authorize(request)
        if name != server.name:
            raise APIError(404, f"The model '{name}' does not exist", param="model",
                           code="model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve(request, "completion", wire.CompletionRequest)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serve(request, "chat", wire.ChatRequest)

    async def serve(request: Request, kind: str, model: type) -> Response:
        server.authorize(request)
        raw = await request.body()
        req = wire.parse(model, raw)
        p = server.prepare(kind, req, request.headers.get("x-priority"), json.loads(raw))
        started = time.monotonic()
        endpoint = p.endpoint
        try:
            route, pieces = server.begin(p)
        except APIError as exc:
            outcome = "refused" if exc.status in (429, 503) else "error"
            server.metrics.requests.labels(endpoint, p.priority, "none", outcome).inc()
            raise
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        headers = {"X-Claw-Route": route, "X-Request-Id": rid}
        tracker = _Tracker(server, p, route, started)
        if p.stream:
            return StreamingResponse(_sse(server, p, rid, pieces, tracker),
                                     headers={**headers, "Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"},
                                     media_type="text/event-stream")
        text = []
        try:
            async for item in pieces:
                if isinstance(item, End):
                    tracker.finish("ok", item)
                    body = wire.completion_body(kind, rid, server.name, "".join(text),
                                                item.finish_reason,
                                                wire.usage(item.prompt_tokens,
                                                           item.completion_tokens))
                    return JSONResponse(body, headers=headers)
                tracker.first()
                text.append(item)
        except APIError:
            tracker.finish("error", None)
            raise
        finally:
            tracker.finish("cancelled", None)
            for job in p.jobs:
                if server.scheduler:
                    server.scheduler.cancel(job)
        raise APIError(500, "the generation ended without a result", type="server_error")

    return app


class _Tracker:
    """Counts one request once, whatever way it ends, under the route that answered it:
    local, offload, or fallback (offloaded, then finished locally)."""

    def __init__(self, server: Server, p: Prepared, route: str, start: float):
        self.m, self.p, self.initial = server.metrics, p, route
        self.start, self.seen_first, self.done = start, False, False

    @property
    def route(self) -> str:
        return "fallback" if self.p.fell_back else self.initial

    def first(self) -> None:
        if not self.seen_first:
            self.seen_first = True
            self.m.first_token.labels(self.route).observe(time.monotonic() - self.start)

    def finish(self, outcome: str, end: End | None) -> None:
        if self.done:
            return
        self.done = True
        route = self.route
        self.m.requests.labels(self.p.endpoint, self.p.priority, route, outcome).inc()
        self.m.latency.labels(route).observe(time.monotonic() - self.start)
        if end is not None:
            self.m.tokens.labels("prompt", route).inc(end.prompt_tokens)
            self.m.tokens.labels("completion", route).inc(end.completion_tokens)


async def _sse(server: Server, p: Prepared, rid: str, pieces: AsyncIterator[str | End],
               tracker: _Tracker) -> AsyncIterator[str]:
    """The pieces as OpenAI's server-sent events; errors after the start become an error
    event (the status line has gone already); a client that leaves cancels the work."""
    name, kind = server.name, p.kind
    try:
        if kind == "chat":
            yield wire.chunk(kind, rid, name, first=True)
        async for item in pieces:
            if isinstance(item, End):
                yield wire.chunk(kind, rid, name, finish=item.finish_reason)
                if p.include_usage:
                    yield wire.chunk(kind, rid, name, use=wire.usage(item.prompt_tokens,
                                                                      item.completion_tokens))
                yield wire.DONE
                tracker.finish("ok", item)
                return
            tracker.first()
            yield wire.chunk(kind, rid, name, text=item)
        raise APIError(500, "the generation ended without a result", type="server_error")
    except Exception as exc:
        if not isinstance(exc, APIError):
            log.exception("stream failed")
            exc = APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                           type="server_error")
        tracker.finish("error", None)
        yield wire.error_event(exc)
        yield wire.DONE
    finally:
        tracker.finish("cancelled", None)
        for job in p.jobs:
            if server.scheduler:
                server.scheduler.cancel(job)
        with contextlib.suppress(Exception):
            await pieces.aclose()  # type: ignore[attr-defined]
