"""Decode speed under a memory budget of 100 %, 50 % and 25 % of the model file's size, against
the same model run with no budget (every weight float32, the peer) in the same run.

A ~380 MB Q8_0 Llama-shaped model of random weights (32 layers, hidden 1024, FFN 2816, 16/4
heads; cached in bench/.cache) runs greedy decoding in a fresh process per budget, each in its
own memory cgroup limited to budget + 10 % when /sys/fs/cgroup/memory is writable. Each row
gives measured and planned decode tokens/s, the plan's tiers, bytes streamed from disk per
token, peak RSS and the cgroup's peak and failcnt; every budget must produce the peer's tokens.

`--backends numpy,opencl` adds the OpenCL rows: its peer is the same model on the OpenCL device
with no budget (every weight uploaded as GGUF blocks), its budgeted runs stream through a ring
of two device buffers (planned with backend="opencl": no float32 tier, no speed estimate).

    .venv/bin/python bench/bench_budget.py [--gen 16] [--budgets 100,50,25]
        [--backends numpy,opencl] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import print_report  # noqa: E402

CACHE = ROOT / "bench" / ".cache"
CGROUPS = Path("/sys/fs/cgroup/memory")
COLUMNS = ["backend", "budget", "budget_mib", "decode_tps", "vs_peer", "planned_tps", "tiers",
           "ring", "streamed_mib_per_token", "peak_rss_mib", "cgroup_peak_mib", "failcnt"]
SHAPE = dict(n_layers=32, dim=1024, ffn_dim=2816, n_heads=16, n_kv_heads=4)


def model_path() -> Path:
    from tests.stream_models import write_stream_model

    path = CACHE / "budget-q8_0.gguf"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        write_stream_model(path, **SHAPE)
    return path


def child(path: Path, budget: int | None, n_gen: int, backend_name: str = "numpy") -> None:
    """One run: load under `budget`, prefill a short prompt, decode `n_gen` greedy tokens."""
    import numpy as np

    from runtime.api import Model

    start = time.perf_counter()
    model = Model(path, backend=backend_name, n_ctx=64, memory_budget=budget,
                  measure=backend_name == "numpy", prefill_chunk=64)
    load_s = time.perf_counter() - start
    backend, cache = model.backend, model.backend.new_cache(64)
    prompt = model.tokenize("the edge of the claw")

    def step(ids: list[int]) -> int:
        if backend.name == "opencl":  # argmax on the device: one id crosses, as generate does
            backend.forward_device(ids, cache)
            return backend.greedy_next()
        return int(np.argmax(backend.forward(ids, cache)[-1]))

    def reads() -> int:
        ring = getattr(backend, "ring", None)
        return backend.w.reads if hasattr(backend, "w") else ring.reads if ring else 0

    token = step(prompt)
    tokens, times = [token], []
    reads0 = reads()
    for _ in range(n_gen):
        t0 = time.perf_counter()
        token = step([token])
        times.append(time.perf_counter() - t0)
        tokens.append(token)
    steady = times[1:]  # the first step still dequantizes the float32 tier
    exp = model.plan.expected()
    print(json.dumps({
        "tokens": tokens, "load_s": load_s,
        "decode_tps": len(steady) / sum(steady),
        "expected_tps": exp["tokens_per_s"] if exp else None,
        "expected_serial_tps": exp["tokens_per_s_serial"] if exp else None,
        "tiers": model.plan.as_dict()["tiers"], "plan_peak": model.plan.peak,
        "streamed_per_token": (reads() - reads0) / n_gen,
        "ring": model.plan.ring,
        "peak_rss": _peak_rss()}))


def _peak_rss() -> int:
    """VmHWM: this process's own peak (ru_maxrss would carry the parent's over fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def drop_page_cache(path: Path) -> None:
    """Forget the file's cached pages, so each run reads (and its cgroup is charged for) all
    it touches instead of finding them charged to whoever wrote the file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run(path: Path, budget: int | None, n_gen: int, tag: str, backend: str = "numpy") -> dict:
    drop_page_cache(path)
    cmd = [sys.executable, __file__, "--child", str(path), "--gen", str(n_gen),
           "--backend", backend]
    if budget is not None:
        cmd += ["--budget", str(budget)]
    group = CGROUPS / f"claw-bench-budget-{os.getpid()}-{tag}"
    use_cgroup = budget is not None and os.access(CGROUPS, os.W_OK)
    if use_cgroup:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(int(budget * 1.1)))
        cmd = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        below = [line for line in done.stderr.splitlines() if "is below the minimum" in line]
        if below:  # a row that says so: e.g. PoCL's ~50 MiB driver leaves 25 % too little
            return {"below_minimum": below[-1].split("ModelError: ")[-1]}
        raise SystemExit(f"run with budget {budget} failed: {done.stderr[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if use_cgroup:
        out["cgroup_peak"] = int((group / "memory.max_usage_in_bytes").read_text())
        out["cgroup_failcnt"] = int((group / "memory.failcnt").read_text())
        group.rmdir()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gen", type=int, default=16)
    parser.add_argument("--budgets", default="100,50,25", help="percent of the model's size")
    parser.add_argument("--backends", default="numpy", help="numpy, opencl or both (comma)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="numpy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.budget, args.gen, args.backend)
        return
    path = model_path()
    size = path.stat().st_size
    rows = []
    for backend in args.backends.split(","):
        peer = run(path, None, args.gen, f"{backend}-peer", backend)
        what = "all f32" if backend == "numpy" else "all on the device"
        rows.append({"backend": backend, "budget": f"none (peer, {what})", "budget_mib": "-",
                     **_cols(peer, peer)})
        for pct in (int(p) for p in args.budgets.split(",")):
            out = run(path, size * pct // 100, args.gen, f"{backend}-{pct}", backend)
            if "below_minimum" in out:
                print(f"{backend}, budget {pct} %: {out['below_minimum']}", file=sys.stderr)
                rows.append({**dict.fromkeys(COLUMNS, "-"), "backend": backend,
                             "budget": f"{pct} %", "budget_mib": round(size * pct / 100 / 2**20),
                             "decode_tps": "below the minimum"})
                continue
            if out["tokens"] != peer["tokens"]:
                raise SystemExit(f"{backend}, budget {pct} %: tokens {out['tokens']} differ "
                                 f"from the peer's {peer['tokens']}")
            rows.append({"backend": backend, "budget": f"{pct} %",
                         "budget_mib": round(size * pct / 100 / 2**20), **_cols(out, peer)})
    report = {"bench": "memory budget decode", "date": time.strftime("%Y-%m-%d"),
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "model": str(path), "model_mib": round(size / 2**20, 1), "shape": SHAPE,
              "n_gen": args.gen, "same_tokens": True, "rows": rows}
    print_report(report, COLUMNS, args.json)


def _cols(out: dict, peer: dict) -> dict:
    mib = 2**20
    return {"decode_tps": round(out["decode_tps"], 2),
            "vs_peer": round(out["decode_tps"] / peer["decode_tps"], 2),
            "planned_tps": f"{out['expected_serial_tps']:.2f}-{out['expected_tps']:.2f}"
            if out["expected_tps"] else "-",
            "ring": f"{out['ring']['slots']} x {out['ring']['slot_bytes'] / mib:.1f} MiB"
            if out.get("ring") else "-",
            "tiers": " ".join(f"{k}:{v}" for k, v in out["tiers"].items() if v),
            "streamed_mib_per_token": round(out["streamed_per_token"] / mib, 1),
            "peak_rss_mib": round(out["peak_rss"] / mib, 1),
            "cgroup_peak_mib": round(out["cgroup_peak"] / mib, 1) if "cgroup_peak" in out
            else "-", "failcnt": out.get("cgroup_failcnt", "-")}


if __name__ == "__main__":
    main()
