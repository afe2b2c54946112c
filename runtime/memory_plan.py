"""What fits in a memory budget: which weights stay resident, which stream from disk, how much
scratch a forward pass needs and how fast decoding should be, decided before anything runs.

The budget is the whole process's resident memory (what a cgroup limit or the OOM killer
sees): the interpreter and libraries already loaded (`baseline`), the KV cache, activation and
attention scratch, and the weights. Weights are planned per *unit*: one transformer layer, or the
output head. Each unit gets a tier:

    f32        dequantized once and kept (fastest: decode reads float32 at memory bandwidth)
    quantized  its GGUF blocks stay mapped; matmuls dequantize bounded row tiles per use
    stream     its blocks are read from disk ahead of use by a background thread and
               released (MADV_DONTNEED + POSIX_FADV_DONTNEED) once the layer has run

Why keep blocks quantized rather than dequantize to float32 like the unbudgeted path does:
numpy has no quantized matmul, so a float32 copy costs 4-8x the file's bytes; dequantizing a
1 MiB tile at a time keeps the resident copy at file size and the float32 scratch bounded,
at the price of dequantizing every weight on every token (~4 GB/s of float32 on one core
here). The planner spends leftover room on f32 units, which are the fast ones.

Expected decode speed comes from timing one real transformer layer of the model itself, a
decode step in each tier (float32, quantized tiles, streamed: its pages dropped, read ahead
cold, then run), scaled by the number of layers in each tier; cached per machine and layer
shape. Short kernel probes (a float32 GEMV, one tensor's quantized GEMV) missed the per-layer
Python and dispatch overhead and the small matrices' lower rates, and overestimated decode
3-4x. The output head is one large matmul, where those rates hold: it is still estimated from
the memory read rate, the per-type quantized rate and the disk bandwidth. Streaming overlaps
reads with compute, so a token costs between max(compute, disk reads) and their sum.

The OpenCL backend gets its own plan (`backend="opencl"`): the device reads GGUF blocks, so a
resident unit costs its file bytes and there is no f32 tier; streamed units go through a ring
of RING_SLOTS device buffers, each the largest streamed unit, filled through one host staging
buffer. On a CPU or iGPU device that memory is the host's, so the plan counts it whole; the
baseline is read after the driver has loaded (PoCL with its compiler is ~50 MiB). It gives no
speed estimate: the timed layer steps are the numpy tiers'.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import ModelError
from runtime.model_file import ModelSource
from runtime.sizes import parse_size

TIERS = ("f32", "quantized", "stream")
TILE_BYTES = 1 << 20  # float32 bytes of one dequantized row tile in a quantized matmul
RING_SLOTS = 2  # OpenCL: device buffers for streamed units (one computing, one uploading)
STAGING_BYTES = 1 << 20  # OpenCL: the host buffer streamed blocks pass through to the device
SLOT_ALIGN = 512  # OpenCL: bytes a tensor in a ring slot may be padded by (sub-buffer origin)
ATTENTION_SCRATCH = 16 << 20  # attention scores of one query block stay under this


def parse_budget(text: str | int | None, what: str = "--memory-budget") -> int | None:
    """'512M', '2G', '1.5GiB', '300000' → bytes (runtime.sizes); None stays None."""
    if text is None or isinstance(text, int):
        return text
    value = parse_size(text)
    if value is None:
        raise ModelError(f"{what} {text!r} is not a size (expected bytes or a number with K, M, "
                         "G or T, e.g. 512M or 2G)")
    if value <= 0:
        raise ModelError(f"{what} {text!r} must be positive (expected e.g. 512M or 2G)")
    return value


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


# ------------------------------------------------------------------------------- measurements

def _cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "clawforge" / "bandwidth.json"


def rss_bytes() -> int:
    """This process's resident memory now (VmRSS), the planner's baseline."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _memory_bandwidth(nbytes: int = 64 << 20) -> float:
    """Bytes/s a one-row matmul reads from a float32 matrix larger than the caches: what a
    decode step over the f32 tier achieves."""
    cols = 1024
    w = np.ones((max(1, nbytes // (4 * cols)), cols), np.float32)
    x = np.ones((1, cols), np.float32)
    best = min(_timed(lambda: x @ w.T) for _ in range(3))
    return w.nbytes / best


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _dequant_bandwidth(source: ModelSource, qtype: str) -> float:
    """float32-equivalent bytes/s of a one-row quantized matmul (tile dequantization, matmul,
    loop) over the largest tensor of this type, its pages in memory: the quantized tier's rate."""
    from runtime.backends.weight_stream import quantized_matmul

    ref = max((r for r in source.tensors.values() if r.qtype.name == qtype and len(r.shape) == 2),
              key=lambda r: r.nbytes)
    x = np.ones((1, ref.shape[1]), np.float32)
    quantized_matmul(x, ref)  # page the bytes in: time the arithmetic, not the disk
    best = min(_timed(lambda: quantized_matmul(x, ref)) for _ in range(3))
    return 4 * ref.shape[0] * ref.shape[1] / best


def _disk_bandwidth(path: Path, nbytes: int = 64 << 20) -> float:
    """Bytes/s reading the model file cold: its page cache dropped first, then read."""
    size = path.stat().st_size
    start, length = max(0, size // 2 - nbytes // 2), min(nbytes, size)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)
        buf, done = bytearray(1 << 20), 0
        t0 = time.perf_counter()
        while done < length:
            n = os.preadv(fd, [memoryview(buf)[:min(len(buf), length - done)]], start + done)
            if n <= 0:
                break
            done += n
        elapsed = time.perf_counter() - t0
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return done / max(elapsed, 1e-9)


@dataclass
class Rates:
    """Measured bytes/s: float32 matmul reads, disk reads of the model file, and quantized
    matmuls per type (in float32-equivalent bytes)."""

    memory: float
    disk: float
    dequant: dict[str, float]
    cached: bool = False
    # seconds of one layer's decode step, by layer kind (`layer_kind`) then tier: "f32",
    # "quantized", "stream" (compute on pages read ahead) and "stream_disk" (the cold read)
    layers: dict[str, dict[str, float]] = field(default_factory=dict)


def layer_kind(source: ModelSource, layer: int) -> str:
    """What a layer's decode cost depends on: the model's shape and the layer's tensor types."""
    c = source.config
    types = "/".join(sorted({r.qtype.name for n, r in source.tensors.items()
                             if n.startswith(f"blk.{layer}.") and len(r.shape) == 2}))
    return (f"{c.dim}x{c.ffn_dim} h{c.n_heads}/{c.n_kv_heads}x{c.head_dim} "
            f"bias{int(c.qkv_bias)} {types}")


def _probe_backend(source: ModelSource, layer: int, tier: str) -> Any:
    """A numpy backend whose plan puts `layer` in `tier` (the rest are never touched)."""
    from runtime.backends.numpy_backend import NumpyBackend

    plan = make_plan(source, None, n_ctx=8, chunk=1, baseline=0)
    plan.budget = 0  # a tiered store: only the units' tiers below decide
    for i, u in enumerate(plan.units):
        u.tier = tier if i == layer else "quantized"
    return NumpyBackend(source, plan=plan)


def _layer_seconds(source: ModelSource, layer: int, f32_room: bool) -> dict[str, float]:
    """Time one decode step of `layer` per tier: quantized (pages mapped), float32 (when
    `f32_room`: its float32 copy fits the budget) and streamed (pages dropped, read ahead as the
    prefetch thread does, then the step on them). Best of a few, after a warm-up step."""
    x = np.random.default_rng(0).standard_normal((1, source.config.dim)).astype(np.float32)
    out: dict[str, float] = {}
    for tier in ("quantized", "f32") if f32_room else ("quantized",):
        backend = _probe_backend(source, layer, tier)
        cache = backend.new_cache(8)
        backend.layer(x, layer, cache)  # pages in, dequantizes the f32 tier: not timed
        # A decode step finds a layer's float32 weights out of the caches (the other layers ran
        # since): evict them before each timed step, as a layer's worth of other data would.
        evict = np.empty(weight_units(source)[0][layer].f32_bytes // 4 if tier == "f32" else 0,
                         np.float32)
        times = []
        for _ in range(3):
            evict.fill(1.0)
            times.append(_timed(lambda b=backend, c=cache: b.layer(x, layer, c)))
        out[tier] = min(times)
        backend.w.close()
        del backend, cache, evict
    backend = _probe_backend(source, layer, "stream")
    cache, store = backend.new_cache(8), backend.w
    refs = [source.tensors[t] for t in store.units[layer]]
    backend.layer(x, layer, cache)  # the small tensors, once
    store._release(refs)  # cold, as a streamed layer is until its read-ahead
    disk, compute = [], []
    for _ in range(2):  # the step maps the read-ahead pages, then gives them back (`leave`)
        disk.append(_timed(lambda s=store: s._read_ahead(layer)))
        compute.append(_timed(lambda b=backend, c=cache, s=store: (b.layer(x, layer, c),
                                                                   s._release(refs))))
    store.close()
    out["stream"], out["stream_disk"] = min(compute), min(disk)
    return out


def measure_rates(source: ModelSource, *, refresh: bool = False,
                  budget: int | None = None) -> Rates:
    """The three rates, from the per-machine cache when there (keyed by host, the model file's
    filesystem and tensor type), else measured (~1 s) and stored. Under a `budget` the memory
    probe's matrix is kept to a quarter of it."""
    path = _cache_path()
    try:
        store = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        store = {}
    mine = store.setdefault(platform.node(), {})
    if not isinstance(mine, dict):
        mine = store[platform.node()] = {}
    files = [source.path] if source.path.is_file() else sorted(source.path.glob("*.safetensors"))
    disk_key = f"dev{files[0].stat().st_dev}"
    qtypes = sorted({r.qtype.name for r in source.tensors.values() if len(r.shape) == 2})
    fresh = False
    if refresh or "memory" not in mine:
        probe = 64 << 20 if budget is None else min(64 << 20, budget // 4)
        mine["memory"], fresh = _memory_bandwidth(probe), True
    disks = mine.setdefault("disk", {})
    if refresh or disk_key not in disks:
        disks[disk_key], fresh = _disk_bandwidth(files[0]), True
    deq = mine.setdefault("dequant", {})
    for q in qtypes:
        if refresh or q not in deq:
            deq[q], fresh = _dequant_bandwidth(source, q), True
    layers = mine.setdefault("layer_steps", {})
    units, _ = weight_units(source)
    for kind, layer in _layer_kinds(source).items():
        key = f"{kind} {disk_key}"
        f32_room = budget is None or units[layer].f32_bytes <= budget // 4
        have = layers.get(key, {})
        if refresh or not have or (f32_room and "f32" not in have):
            layers[key], fresh = {**have, **_layer_seconds(source, layer, f32_room)}, True
    if fresh:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(store, indent=1), encoding="utf-8")
        tmp.replace(path)
    return Rates(mine["memory"], disks[disk_key], {q: deq[q] for q in qtypes}, cached=not fresh,
                 layers={k: layers[f"{k} {disk_key}"] for k in _layer_kinds(source)})


def _layer_kinds(source: ModelSource) -> dict[str, int]:
    """Each kind of layer and the layer that stands for it (the middle one of its kind)."""
    kinds: dict[str, list[int]] = {}
    for i in range(source.config.n_layers):
        kinds.setdefault(layer_kind(source, i), []).append(i)
    return {k: v[len(v) // 2] for k, v in kinds.items()}


# ------------------------------------------------------------------------------------ the plan

@dataclass
class Unit:
    """A layer (or the output head): its matrices, their file bytes and float32 bytes."""

    name: str
    tensors: list[str]
    quantized_bytes: int
    f32_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)  # per token, by tier (compute)
    seconds_disk: float = 0.0  # per token when streamed: the cold read
    tier: str = "f32"


@dataclass
class Plan:
    budget: int | None
    n_ctx: int
    chunk: int
    baseline: int  # the process before any weight is read
    kv_cache: int
    activations: int
    attention_scratch: int
    attention_rows: int  # queries per attention block: scores stay under ATTENTION_SCRATCH
    tile_scratch: int
    small_tensors: int  # norms and biases, always float32
    stream_slots: int  # file bytes of the two largest streamed units (current + prefetched)
    units: list[Unit] = field(default_factory=list)
    rates: Rates | None = None
    backend: str = "numpy"  # "opencl": no f32 tier, streamed units go through a device ring
    ring_slot_bytes: int = 0  # OpenCL: one ring slot (the largest streamed unit, aligned)

    @property
    def fixed(self) -> int:
        """Everything but the resident weights."""
        return (self.baseline + self.kv_cache + self.activations + self.attention_scratch
                + self.tile_scratch + self.small_tensors)

    @property
    def minimum(self) -> int:
        """The smallest budget that runs: fixed costs plus one streamed layer and the next (on
        OpenCL: a ring of slots for the largest unit, and the staging buffer)."""
        if self.backend == "opencl":
            return self.fixed + RING_SLOTS * max(map(slot_bytes, self.units)) + STAGING_BYTES
        return self.fixed + 2 * max(u.quantized_bytes for u in self.units)

    @property
    def weights_resident(self) -> int:
        return sum(u.f32_bytes if u.tier == "f32" else u.quantized_bytes
                   for u in self.units if u.tier != "stream")

    @property
    def streaming(self) -> bool:
        return any(u.tier == "stream" for u in self.units)

    @property
    def peak(self) -> int:
        """The most this plan holds at once."""
        return self.fixed + self.weights_resident + (self.stream_slots if self.streaming else 0)

    @property
    def ring(self) -> dict[str, int] | None:
        """OpenCL's ring of device buffers when units stream: slots, bytes per slot and the
        host staging buffer; on a unified-memory device (a CPU, an iGPU) the ring is host
        memory too, which is why `stream_slots` counts it whole."""
        if self.backend != "opencl" or not self.streaming:
            return None
        return {"slots": RING_SLOTS, "slot_bytes": self.ring_slot_bytes,
                "device_bytes": RING_SLOTS * self.ring_slot_bytes, "staging_bytes": STAGING_BYTES}

    def tiers(self) -> dict[str, str]:
        return {t: u.tier for u in self.units for t in u.tensors}

    def expected(self) -> dict[str, float] | None:
        """Seconds per decoded token: compute (float32 reads, dequantization), disk reads, and
        the tokens/s they allow when reads overlap compute fully (`tokens_per_s`, the upper
        bound) and not at all (`tokens_per_s_serial`, e.g. on cores busy with other work)."""
        if self.rates is None:
            return None
        compute = sum(u.seconds[u.tier] for u in self.units)
        disk = sum(u.seconds_disk for u in self.units if u.tier == "stream")
        return {"compute_s": compute, "disk_s": disk,
                "tokens_per_s": 1.0 / max(compute, disk, 1e-9),
                "tokens_per_s_serial": 1.0 / max(compute + disk, 1e-9)}

    def as_dict(self) -> dict[str, Any]:
        counts = {t: sum(u.tier == t for u in self.units) for t in TIERS}
        return {
            "budget": self.budget, "minimum_budget": self.minimum, "peak": self.peak,
            "n_ctx": self.n_ctx, "prefill_chunk": self.chunk, "baseline": self.baseline,
            "kv_cache": self.kv_cache, "activations": self.activations,
            "attention_scratch": self.attention_scratch, "attention_rows": self.attention_rows,
            "tile_scratch": self.tile_scratch, "small_tensors": self.small_tensors,
            "weights_resident": self.weights_resident,
            "stream_slots": self.stream_slots if self.streaming else 0,
            "backend": self.backend, "ring": self.ring,
            "tiers": counts,
            "units": [{"name": u.name, "tier": u.tier, "quantized_bytes": u.quantized_bytes,
                       "f32_bytes": u.f32_bytes} for u in self.units],
            "rates": None if self.rates is None else asdict(self.rates),
            "expected": self.expected(),
        }

    def summary(self) -> str:
        """One line: what is resident, what streams, and the expected speed."""
        counts = {t: [u.name for u in self.units if u.tier == t] for t in TIERS}
        parts = [f"{len(v)} {t}" for t, v in counts.items() if v]
        exp = self.expected()
        budget = "no budget" if self.budget is None else f"budget {mib(self.budget)}"
        ring = self.ring
        if ring:
            parts.append(f"OpenCL ring {ring['slots']} x {mib(ring['slot_bytes'])} + staging "
                         f"{mib(ring['staging_bytes'])}")
        return (f"memory plan: {budget}, peak ~{mib(self.peak)} (baseline {mib(self.baseline)}, "
                f"KV cache {mib(self.kv_cache)}, scratch "
                f"{mib(self.activations + self.attention_scratch + self.tile_scratch)}); "
                f"units: {', '.join(parts)}"
                + (f" (stream: {unit_ranges(counts['stream'])})" if counts["stream"] else "")
                + (f"; expected decode {exp['tokens_per_s_serial']:.2f}–"
                   f"{exp['tokens_per_s']:.2f} tok/s "
                   f"(compute {exp['compute_s'] * 1e3:.0f} ms, disk {exp['disk_s'] * 1e3:.0f} ms"
                   " per token)" if exp else ""))


def unit_ranges(names: list[str]) -> str:
    """['blk.3', 'blk.4', 'blk.5', 'head'] → 'blk.3-5, head'."""
    out: list[str] = []
    for n in names:
        last = out[-1] if out else ""
        if n.startswith("blk.") and last.startswith("blk."):
            hi = int(last.split("-")[-1].removeprefix("blk."))
            if int(n[4:]) == hi + 1:
                out[-1] = f"{last.split('-')[0]}-{n[4:]}"
                continue
        out.append(n)
    return ", ".join(out)


def slot_bytes(unit: Unit) -> int:
    """Bytes of an OpenCL ring slot holding `unit`: its blocks, each tensor's start aligned."""
    return unit.quantized_bytes + SLOT_ALIGN * len(unit.tensors)


def weight_units(source: ModelSource) -> tuple[list[Unit], int]:
    """The layers and the output head as units, and the float32 bytes of the 1-D tensors."""
    cfg = source.config
    head = "token_embd.weight" if cfg.tied_embeddings else "output.weight"
    groups = [(f"blk.{i}", [n for n, r in source.tensors.items()
                            if n.startswith(f"blk.{i}.") and len(r.shape) == 2])
              for i in range(cfg.n_layers)] + [("head", [head])]
    units = []
    for name, tensors in groups:
        refs = [source.tensors[t] for t in tensors]
        units.append(Unit(name, tensors, sum(r.nbytes for r in refs),
                          sum(4 * int(np.prod(r.shape)) for r in refs)))
    small = sum(4 * int(np.prod(r.shape)) for r in source.tensors.values() if len(r.shape) == 1)
    return units, small


def scratch(source: ModelSource, n_ctx: int, chunk: int) -> dict[str, int]:
    """Bytes of the KV cache and of one forward pass's float32 temporaries for `chunk` tokens."""
    c = source.config
    T, C, F, H, KV, D = chunk, c.dim, c.ffn_dim, c.n_heads, c.n_kv_heads, c.head_dim
    kv = 2 * c.n_layers * n_ctx * KV * D * 4
    # x, its norm, the attention output and its projection; q, k, v; rotated copies of q, k;
    # gate, up and their product; the embedding rows; one row of logits.
    act = 4 * (T * (4 * C + 2 * (H + 2 * KV) * D + 3 * F + C) + c.vocab_size)
    rows = max(1, min(T, ATTENTION_SCRATCH // (3 * 4 * H * n_ctx)))
    attn = 3 * 4 * H * rows * n_ctx  # scores, their exponentials, the masked copy
    return {"kv_cache": kv, "activations": act, "attention_scratch": attn,
            "attention_rows": rows, "tile_scratch": 3 * TILE_BYTES}  # tile, its temporaries


def check_budget(path: str | os.PathLike[str], budget: str | int, *, n_ctx: int | None = None,
                 chunk: int = 256, sequences: int = 1, backend: str = "numpy") -> Plan:
    """The plan for running `path` under `budget`, without timing anything, so that a server
    refuses a budget below the minimum at start (exit 2, one line) rather than in its log."""
    from runtime.model_file import open_model

    source = open_model(path)
    ctx = min(n_ctx or source.config.context_length, source.config.context_length)
    return make_plan(source, parse_budget(budget), n_ctx=ctx, chunk=chunk, sequences=sequences,
                     backend=plan_backend(backend))


def plan_backend(backend: str) -> str:
    """Which plan a backend choice runs: `opencl` its own (device ring, no float32 tier);
    numpy and auto (which streams on numpy) the numpy one."""
    return "opencl" if backend == "opencl" else "numpy"


def make_plan(source: ModelSource, budget: int | None, *, n_ctx: int, chunk: int = 256,
              baseline: int | None = None, rates: Rates | None = None,
              sequences: int = 1, backend: str = "numpy") -> Plan:
    """Tier every unit under `budget` (None: everything float32, as without a budget).

    Everything fits as file bytes → all `quantized`, then units are promoted to `f32` in order
    while the extra float32 bytes fit. Otherwise two streaming slots are set aside and units
    stay `quantized` in order while their bytes fit; the rest `stream`. `sequences` KV caches
    are counted (a server decoding a batch holds one per sequence).

    `backend="opencl"`: the device keeps GGUF blocks (no `f32` tier, no host tiles); the
    streaming reserve is a ring of RING_SLOTS device buffers sized for the largest unit plus
    the host staging buffer, then shrunk to the largest unit that does stream."""
    units, small = weight_units(source)
    chunk = min(chunk, n_ctx)
    s = scratch(source, n_ctx, chunk)
    plan = Plan(budget, n_ctx, chunk, rss_bytes() if baseline is None else baseline,
                s["kv_cache"] * sequences, s["activations"], s["attention_scratch"],
                s["attention_rows"], s["tile_scratch"], small, 0, units, rates, backend)
    top2 = sorted((u.quantized_bytes for u in units), reverse=True)[:2]
    plan.stream_slots = sum(top2)
    if backend == "opencl":
        plan.tile_scratch = 0
        plan.stream_slots = plan.minimum - plan.fixed
    if rates is not None:
        for i, u in enumerate(units):
            u.seconds = {"f32": u.f32_bytes / rates.memory, "quantized": sum(
                4 * int(np.prod(source.tensors[t].shape)) / rates.dequant[
                    source.tensors[t].qtype.name] for t in u.tensors)}
            u.seconds["stream"], u.seconds_disk = u.seconds["quantized"], \
                u.quantized_bytes / rates.disk
            timed = rates.layers.get(layer_kind(source, i)) if i < len(units) - 1 else None
            if timed:  # a real layer's step: what the rates above miss
                u.seconds.update({t: timed[t] for t in TIERS if t in timed})
                u.seconds_disk = timed["stream_disk"]
    if budget is None:
        return plan
    if budget < plan.minimum:
        slots = "two streamed layers" if backend != "opencl" else \
            f"an OpenCL ring of {RING_SLOTS} slots and staging"
        raise ModelError(
            f"--memory-budget {mib(budget)} is below the minimum of {mib(plan.minimum)} this "
            f"model needs with --ctx {n_ctx} (process {mib(plan.baseline)}, KV cache "
            f"{mib(plan.kv_cache)}, scratch "
            f"{mib(plan.activations + plan.attention_scratch + plan.tile_scratch)}, {slots} "
            f"{mib(plan.stream_slots)}; expected ≥ {plan.minimum} bytes, or a "
            "smaller --ctx)")
    room = budget - plan.fixed
    if room >= sum(u.quantized_bytes for u in units):
        room -= sum(u.quantized_bytes for u in units)
        for u in units:
            u.tier = "quantized"
            if u.f32_bytes - u.quantized_bytes <= room and backend != "opencl":
                u.tier, room = "f32", room - (u.f32_bytes - u.quantized_bytes)
        return plan
    room -= plan.stream_slots
    for u in units:
        if u.quantized_bytes <= room:
            u.tier, room = "quantized", room - u.quantized_bytes
        else:
            u.tier = "stream"
    if backend == "opencl":
        plan.ring_slot_bytes = max(slot_bytes(u) for u in units if u.tier == "stream")
        plan.stream_slots = RING_SLOTS * plan.ring_slot_bytes + STAGING_BYTES
    return plan
