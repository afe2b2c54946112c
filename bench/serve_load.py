"""Serving throughput and latency of `claw runtime serve` at 1, 4 and 16 concurrent clients.

Four servers run as real processes on loopback ports, on the same small random-weight model
(cached in bench/.cache): the edge with batched decode (max_batch 16), the same edge with
max_batch 1 as the peer (one sequence at a time, what a server without batching does), and
the edge under (injected) memory pressure offloading its normal requests to a second instance
of our server acting as the cloud. Each client sends non-streaming chat requests back to back
with greedy decoding of a fixed length; the table gives completion tokens/s, requests/s and
p50/p99 latency, and the batched edge's throughput as a ratio of the peer's.

    .venv/bin/python bench/serve_load.py [--clients 1,4,16] [--tokens 32] [--requests 3]
                                         [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import print_report  # noqa: E402

CACHE = ROOT / "bench" / ".cache" / "serve-model"
SHAPE = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
MESSAGES = [{"role": "user", "content": "Describe how an edge fleet rolls out an update."}]


async def load(url: str, clients: int, per_client: int, tokens: int) -> dict:
    import httpx

    latencies: list[float] = []
    completion = 0
    routes: dict[str, int] = {}

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal completion
        for _ in range(per_client):
            start = time.perf_counter()
            r = await http.post("/v1/chat/completions", json={
                "model": "tiny", "messages": MESSAGES, "max_tokens": tokens,
                "temperature": 0})
            r.raise_for_status()
            latencies.append(time.perf_counter() - start)
            completion += r.json()["usage"]["completion_tokens"]
            route = r.headers["x-claw-route"]
            routes[route] = routes.get(route, 0) + 1

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await client_warmup(http, tokens)
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    return {"tokens_per_s": round(completion / wall, 1),
            "requests_per_s": round(len(latencies) / wall, 2),
            "p50_s": round(statistics.median(latencies), 3), "p99_s": round(p99, 3),
            "requests": len(latencies), "routes": routes}


async def client_warmup(http, tokens: int) -> None:
    await http.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES,
                                                  "max_tokens": tokens})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=3, help="requests per client")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS threads per server (the cores are shared by 3 processes)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from tests.integration.serve_helpers import start_server
    from tests.serve_model import tiny_chat_gguf

    CACHE.mkdir(parents=True, exist_ok=True)
    model = tiny_chat_gguf(CACHE, **SHAPE)
    work = CACHE / "run"
    work.mkdir(exist_ok=True)
    inject = work / "pressure.json"
    inject.write_text("{}")
    levels = [int(c) for c in args.clients.split(",")]
    base = {"model": str(model), "model_name": "tiny", "log_level": "warning",
            "threads": args.threads}
    queue = {"max_queue": 1024}
    rows: list[dict] = []
    edges: dict[str, object] = {}
    cloud = start_server(work, {**base, "model_name": "cloud",
                                "scheduler": {"max_batch": 16, **queue}}, name="cloud")
    try:
        setups = [
            ("local, batched (max_batch 16)", {"scheduler": {"max_batch": 16, **queue}}),
            ("local, one at a time (peer)", {"scheduler": {"max_batch": 1, **queue}}),
            ("offload under pressure", {
                "scheduler": {"max_batch": 16, **queue},
                "offload": {"enabled": True, "url": cloud.v1, "model": "cloud",
                            "timeout_s": 600},
                "monitor": {"interval_s": 0.1, "inject_file": str(inject)}}),
        ]
        inject.write_text(json.dumps({"psi_some_avg10": 99.0}))  # only the third reads it
        for name, extra in setups:
            edges[name] = start_server(work, {**base, **extra}, name=f"edge{len(edges)}")
        for clients in levels:  # interleaved, so that drift in the machine's load is shared
            for name, _ in setups:
                result = asyncio.run(load(edges[name].url, clients, args.requests,
                                          args.tokens))
                rows.append({"setup": name, "clients": clients, **result})
                print(f"  {name}, {clients} clients: {result}", file=sys.stderr)
    finally:
        for edge in edges.values():
            edge.stop()
        cloud.stop()
    peer = {r["clients"]: r["tokens_per_s"] for r in rows if "peer" in r["setup"]}
    for r in rows:
        r["vs_peer"] = round(r["tokens_per_s"] / peer[r["clients"]], 2) \
            if peer.get(r["clients"]) else None
    report = {"benchmark": "serve_load", "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
              "model": f"random Llama, {SHAPE['num_hidden_layers']} layers, width "
                       f"{SHAPE['hidden_size']}, Q8_0",
              "max_tokens": args.tokens, "requests_per_client": args.requests, "rows": rows}
    print_report(report, ["setup", "clients", "tokens_per_s", "requests_per_s", "p50_s",
                          "p99_s", "vs_peer", "routes"], args.json)


if __name__ == "__main__":
    main()
