"""`claw runtime bench`: llama-bench-style prompt processing (pp) and text generation (tg)
speed of one backend on one model file, with peak memory, decode's achieved memory bandwidth
against the device's own measured copy bandwidth, and load time.

pp<P>: P prompt tokens in one forward pass from an empty cache. tg<N>: N greedy decode steps
from an empty cache (on the OpenCL backend the argmax runs on the device). Each is repeated
`repeats` times; mean ± sd of tokens/s as llama-bench reports them.
"""

from __future__ import annotations

import gc
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np


def _decode_bytes(backend: Any) -> int:
    """Bytes a decode step must stream: every weight except the embedding table (one row)."""
    src, cfg = backend.source, backend.config
    total = sum(ref.nbytes for name, ref in src.tensors.items() if name != "token_embd.weight")
    return total + (src.tensors["token_embd.weight"].nbytes if cfg.tied_embeddings else 0)


def host_copy_bandwidth(nbytes: int = 256 << 20) -> float:
    """Bytes/s (read + write) of a large numpy copy: the numpy backend's memory ceiling."""
    src, dst = np.ones(nbytes, np.uint8), np.zeros(nbytes, np.uint8)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def _load(path: Path, backend: str, budget: int | None = None,
          n_ctx: int = 0) -> tuple[Any, str, float]:
    from runtime.backends import create_backend
    from runtime.memory_plan import make_plan, measure_rates, plan_backend
    from runtime.model_file import open_model

    start = time.perf_counter()
    source = open_model(path)
    plan, device = None, None
    if budget is not None and plan_backend(backend) == "opencl":  # the driver in the baseline
        from runtime.api import open_opencl_device

        device = open_opencl_device()
        plan = make_plan(source, budget, n_ctx=n_ctx, chunk=n_ctx, backend="opencl")
    elif budget is not None:  # the pp test runs the whole prompt as one chunk
        plan = make_plan(source, budget, n_ctx=n_ctx, chunk=n_ctx,
                         rates=measure_rates(source, budget=budget))
    choice = create_backend(backend, source, plan=plan, device=device)
    return choice.backend, choice.reason, time.perf_counter() - start


def _run(backend: Any, prompt: list[int], n_gen: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) for one repetition."""
    on_device = backend.name == "opencl"
    cache = backend.new_cache(len(prompt) + 1)
    start = time.perf_counter()
    if on_device:
        backend.forward_device(prompt, cache)
        backend.greedy_next()
    else:
        backend.forward(prompt, cache)
    prefill = time.perf_counter() - start
    cache = backend.new_cache(n_gen + 1)
    token = 1
    start = time.perf_counter()
    for _ in range(n_gen):
        if on_device:
            backend.forward_device([token], cache)
            token = backend.greedy_next()
        else:
            token = int(np.argmax(backend.forward([token], cache)[-1]))
    return prefill, time.perf_counter() - start


def _plan_report(backend: Any) -> dict[str, Any]:
    plan = getattr(backend, "plan", None)
    if plan is None or plan.budget is None:
        return {}
    ring = getattr(backend, "ring", None)
    return {"memory_plan": plan.as_dict(), "memory_plan_summary": plan.summary(),
            "streamed_bytes": backend.w.reads if hasattr(backend, "w") else
            ring.reads if ring else 0}


def bench(path: Path, backend_name: str = "auto", n_prompt: int = 512, n_gen: int = 128,
          repeats: int = 5, memory_budget: int | str | None = None) -> dict[str, Any]:
    from runtime.memory_plan import parse_budget

    budget, n_ctx = parse_budget(memory_budget), max(n_prompt, n_gen) + 1
    backend, reason, load_s = _load(path, backend_name, budget, n_ctx)
    info: dict[str, Any] = {}
    cold_load_s = None
    if backend.name == "opencl":
        info = backend.describe()
        if info["programs"]["compiled"]:  # measure the warm start too: the cache is now full
            del backend
            gc.collect()
            cold_load_s = load_s
            backend, reason, load_s = _load(path, backend_name, budget, n_ctx)
            info = backend.describe()
    cfg = backend.config
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(3, cfg.vocab_size, n_prompt)]
    _run(backend, prompt, 2)  # warm-up, as llama-bench: first launches, numpy dequantizes
    pp, tg = [], []
    for _ in range(repeats):
        prefill, decode = _run(backend, prompt, n_gen)
        pp.append(n_prompt / prefill)
        tg.append(n_gen / decode)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the probe
    if backend.name == "opencl":
        from runtime.backends.opencl_device import copy_bandwidth

        device_bw = copy_bandwidth(backend.dev, backend.kern.ops)
        device = backend.dev.describe()
    else:
        probe = 256 << 20 if budget is None else min(256 << 20, budget // 4)  # stay in budget
        device_bw, device = host_copy_bandwidth(probe), "host CPU (numpy)"
    decode_bytes = _decode_bytes(backend)
    achieved = decode_bytes * statistics.mean(tg)
    size = sum(ref.nbytes for ref in backend.source.tensors.values())

    def row(test: str, values: list[float]) -> dict[str, Any]:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return {"model": path.name, "size_mib": round(size / 2**20, 1),
                "params_m": round(backend.source.n_params() / 1e6, 1), "backend": backend.name,
                "test": test, "tps_mean": round(statistics.mean(values), 2),
                "tps_sd": round(sd, 2), "t/s": f"{statistics.mean(values):.2f} ± {sd:.2f}"}

    return {"model": str(path), "backend": backend.name, "backend_reason": reason,
            "device": device, "repeats": repeats,
            "rows": [row(f"pp{n_prompt}", pp), row(f"tg{n_gen}", tg)],
            "peak_rss_mib": round(peak_rss / 2**20, 1),
            "decode_bytes_per_token": decode_bytes,
            "decode_bandwidth_gbs": round(achieved / 1e9, 2),
            "device_copy_bandwidth_gbs": round(device_bw / 1e9, 2),
            "bandwidth_fraction": round(achieved / device_bw, 3),
            "load_s": round(load_s, 3),
            **({"cold_load_s": round(cold_load_s, 3)} if cold_load_s is not None else {}),
            **_plan_report(backend),
            **({"opencl": info} if info else {})}
