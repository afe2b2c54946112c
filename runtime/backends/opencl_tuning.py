"""Work-group sizes and tile shapes per device: defaults by device kind, a short search
(`claw runtime tune`) that times the real kernels on the device, and a JSON store of the winner
per device under the program cache directory (tuning/<device key>.json).

CPU devices (PoCL) do best with one work-item per output row, many rows per work-group (PoCL
runs a work-group's items as a vectorized loop) and wide token tiles; GPUs want a whole
sub-group on each row, reducing in local memory (or, on NVIDIA, by warp shuffles).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
from gguf import GGMLQuantizationType as T

from runtime.backends.opencl_device import Device, event_seconds, profiling_queue
from runtime.backends.opencl_kernels import Kernels, Params, host_has_vnni
from runtime.backends.opencl_programs import ProgramCache, cache_dir, kernel_source
from runtime.backends.weight_stream import Q8_ACTIVATION_TYPES
from runtime.quant import quantize


def default_params(dev: Device) -> Params:
    if dev.is_cpu:
        return Params(LWS=1, RPW=16, TT=8, WG=16, SPLIT=128, UNALIGNED=1)
    # GPUs: a warp a row; QU 8 and SHFL from the H200's sweeps (bench/RESULTS.md)
    return Params(LWS=32, RPW=4, TT=4, WG=64, SPLIT=256, DP4A=1, QU=8, SHFL=1)


def _path(dev: Device) -> Path:
    """One file per device and kernel source: changed kernels are tuned afresh."""
    sources = {name: hashlib.sha256(kernel_source(name).encode()).hexdigest()
               for name in ("matmul", "ops")}
    ident = json.dumps({"device": dev.identity(), "sources": sources}, sort_keys=True)
    return cache_dir() / "tuning" / f"{hashlib.sha256(ident.encode()).hexdigest()[:24]}.json"


def load_params(dev: Device) -> tuple[Params, str]:
    """The stored tuned parameters for this device, else the defaults; and where they came from."""
    path = _path(dev)
    try:
        data = json.loads(path.read_text())
        known = {f.name for f in fields(Params)}
        return Params(**{k: int(v) for k, v in data["params"].items() if k in known}), str(path)
    except (OSError, ValueError, KeyError, TypeError):
        return default_params(dev), "defaults"


def save_params(dev: Device, params: Params, timings: dict) -> Path:
    path = _path(dev)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tune.")
    with os.fdopen(fd, "w") as f:
        json.dump({"device": dev.identity(), "params": asdict(params), "timings": timings}, f,
                  indent=2)
    os.replace(tmp, path)
    return path


def _best_time(run: Callable[[], None], dev: Device, repeats: int) -> float:
    run()
    dev.queue.finish()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        dev.queue.finish()
        best = min(best, time.perf_counter() - start)
    return best


class GemvTiming(NamedTuple):
    bytes_per_s: float  # the weight's bytes over the best launch's device time
    seconds: float  # that launch's device time
    y: np.ndarray  # the product of the last launch: x is all ones, so each row's weight sum
    layout: str  # the matrix's layout on the device (DeviceMatrix.layout_name)


def gemv_bandwidth(dev: Device, params: Params, programs: ProgramCache, raw: np.ndarray,
                   qtype: T, shape: tuple[int, int], repeats: int = 20,
                   repack: bool = True) -> GemvTiming:
    """The best of `repeats` decode matmuls (one token) of the weight `raw`, timed by the
    device's own event clock. The weight is uploaded once and copied on the device until the
    copies overflow its cache four times (256 MiB at least); the launches take them in turn, so
    that each one reads memory, not a cache that still holds the last (an H100's 50 MB L2
    holds a whole 4096 x 14336 Q4_0 matrix). A quantized type's activation rounding is done once,
    outside the timing: what is measured is the product's weight stream."""
    kern = Kernels(replace(dev, queue=profiling_queue(dev)), params, programs)
    cache = int(getattr(dev.device, "global_mem_cache_size", 0) or 0)  # an H200 says 4 MiB
    copies = max(1, min(8, -(-max(4 * cache, 256 << 20) // raw.nbytes)))  # for its 60 MB L2
    first = kern.upload_matrix(raw, qtype, shape, repack=repack)
    if len(first.parts) != 1:
        raise ValueError(f"a {raw.nbytes}-byte matrix is split on this device: time a smaller one")
    mats = [first]
    for _ in range(copies - 1):
        buf = first.parts[0][2]
        twin = kern.empty(buf.size)
        kern.cl.enqueue_copy(kern.queue, twin, buf)
        mats.append(replace(first, parts=[(0, shape[0], twin)]))
    x, y = kern.upload(np.ones(shape[1], np.float32)), kern.empty(4 * shape[0])
    q8 = kern.quantize_q8(x, shape[1], 1) if qtype in Q8_ACTIVATION_TYPES else None
    best = float("inf")
    for i in range(repeats + copies):  # the first pass over the copies warms up
        kern.matmul(mats[i % copies], x, y, 1, q8=q8)
        if i >= copies:
            best = min(best, event_seconds(kern.last_event))
    out = kern.read(y, (shape[0],))
    for m in mats:
        m.parts[0][2].release()
    return GemvTiming(raw.nbytes / best, best, out, first.layout_name)


def candidates(dev: Device) -> list[Params]:
    """The small grid that `tune` searches (matmul shapes first, then attention)."""
    base = default_params(dev)
    lws = [1, 4] if dev.is_cpu else [8, 16, 32, 64]
    rpw = [1, 4, 16] if dev.is_cpu else [1, 2, 4, 8]
    grid = []
    for a in lws:
        for r in rpw:
            if a * r <= min(dev.device.max_work_group_size, 256):
                grid.append(Params(**{**asdict(base), "LWS": a, "RPW": r}))
    return grid


def tune(dev: Device, programs: ProgramCache, *, rows: int = 2048, cols: int = 2048,
         prompt: int = 64, repeats: int = 3, log: Callable[[str], None] = print) -> Params:
    """Time decode and prefill matmuls (Q4_0, a rows x cols matrix) for each candidate (on
    GPUs then loads in flight and warp shuffles for the best shape), then token tiles (on Q5_K;
    on AVX-512 VNNI hosts on F16, since there the quantized types' prefill runs matmul.cl's
    qgemm8, whose 8 x 8 tile is fixed, so TT would be timed on noise) and attention split
    sizes, and store the fastest set for this device."""
    rng = np.random.default_rng(0)
    w32 = rng.standard_normal((rows, cols)).astype(np.float32)
    tile_type = T.F16 if host_has_vnni(dev) else T.Q5_K
    raws = {q: quantize(w32, q) for q in (T.Q4_0, tile_type)}
    x = rng.standard_normal((prompt, cols)).astype(np.float32)
    timings: dict[str, float] = {}

    def score(p: Params, qtype: T = T.Q4_0) -> float:
        kern = Kernels(dev, p, programs)
        w = kern.upload_matrix(raws[qtype], qtype, (rows, cols))
        xb, yb = kern.upload(x), kern.empty(prompt * rows * 4)
        vec = _best_time(lambda: kern.matmul(w, xb, yb, 1), dev, repeats)
        mat = _best_time(lambda: kern.matmul(w, xb, yb, prompt), dev, repeats)
        key = " ".join([f"{k}={v}" for k, v in asdict(p).items()] + [qtype.name])
        timings[key] = vec * 1e3
        log(f"  {key}: decode {vec * 1e3:.3f} ms, prefill {mat * 1e3:.2f} ms")
        return vec + mat / prompt  # a decode step weighs as much as a prompt token

    best = min(candidates(dev), key=score)
    if not dev.is_cpu:  # GPU decode over planes: loads in flight, warp-shuffle reductions
        best = min([replace(best, QU=qu, SHFL=sh) for qu in (2, 4, 8) for sh in (0, 1)],
                   key=score)
    tiles = [Params(**{**asdict(best), "TT": tt}) for tt in (2, 4, 8)]
    best = min(tiles, key=lambda p: score(p, tile_type))
    save_params(dev, best, timings)
    return best
