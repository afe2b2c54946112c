"""A misbehaving cloud endpoint for the offload tests: a reverse proxy in front of a real
server (our own, on another port) that, per its current mode, passes requests through, answers
500, stalls past the client's timeout, or cuts the stream after a few events without the
closing chunk. POST /_mode {"mode": ...} switches; "mixed" cycles through all of them.

    python -m tests.integration.fault_proxy --port 9001 --upstream http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODES = ("pass", "500", "slow", "cut")


def make_app(upstream: str, slow_s: float, cut_after: int) -> Starlette:
    state = {"mode": "pass", "served": {m: 0 for m in MODES}, "last_fields": []}
    cycle = itertools.cycle(MODES)
    client = httpx.AsyncClient(base_url=upstream, timeout=60)

    async def set_mode(request: Request) -> Response:
        state["mode"] = (await request.json())["mode"]
        return JSONResponse({"mode": state["mode"], "served": state["served"]})

    async def stats(_: Request) -> Response:
        return JSONResponse(state)

    async def proxy(request: Request) -> Response:
        mode = state["mode"]
        if mode == "mixed":
            mode = next(cycle)
        state["served"][mode] += 1
        if mode == "500":
            return JSONResponse({"error": {"message": "injected failure", "type": "server_error",
                                           "param": None, "code": None}}, status_code=500)
        if mode == "slow":
            await asyncio.sleep(slow_s)
        body = await request.body()
        state["last_fields"] = sorted(json.loads(body))
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        req = client.build_request("POST", request.url.path, content=body,
                                   headers={**headers, "content-type": "application/json"})
        resp = await client.send(req, stream=True)

        async def relay():
            events = 0
            try:
                async for line in resp.aiter_lines():
                    yield line + "\n"
                    if line.startswith("data:"):
                        events += 1
                        if mode == "cut" and events >= cut_after:
                            raise ConnectionAbortedError("injected: stream cut")
            finally:
                await resp.aclose()

        return StreamingResponse(relay(), status_code=resp.status_code,
                                 media_type=resp.headers.get("content-type"))

    return Starlette(routes=[
        Route("/_mode", set_mode, methods=["POST"]),
        Route("/_stats", stats, methods=["GET"]),
        Route("/{path:path}", proxy, methods=["POST"]),
    ])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--slow-s", type=float, default=5.0)
    parser.add_argument("--cut-after", type=int, default=3)
    args = parser.parse_args()
    uvicorn.run(make_app(args.upstream, args.slow_s, args.cut_after), host="127.0.0.1",
                port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
