"""Decode's quantized matrix-vector product against the device's own copy bandwidth.

For each weight type, a rows x cols matrix (default 14336 x 4096, a Llama-3-8B FFN matrix) is
multiplied by one token's activations on the OpenCL device, timed by the device's event clock,
with the matrix in enough copies to overflow the device's cache (runtime.backends.opencl_tuning
.gemv_bandwidth). The peer, measured in the same run, is the device's float4 copy kernel
(read + write bytes / s): the ratio is what the `gpu` tier's 80 % target is stated in.
Every shape's product is checked against numpy (column `ok`). --sweep also times the knobs
`claw runtime tune` and the defaults set (see `sweep`), to show which shape the device wants.

    .venv/bin/python bench/bench_gemv.py [--device gpu|cpu|any] [--types q8_0,q4_0,q4_k,q6_k,f16]
                                         [--rows 14336 --cols 4096] [--sweep] [--json]
                                         [--set SHFL=1,QU=8]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import print_report  # noqa: E402

SHOWN = ("LWS", "RPW", "DP4A", "QU", "SHFL")  # the knobs a decode matmul's speed depends on


def with_knobs(params: Any, text: str) -> Any:
    """params with --set's "K=V,..." applied (ValueError/TypeError on a bad pair or name)."""
    knobs = dict(kv.split("=") for kv in text.split(",") if kv.strip())
    return replace(params, **{k.strip(): int(v) for k, v in knobs.items()})


def grid(dev: Any, base: Any) -> list[Any]:
    """The work-group shapes `claw runtime tune` would try (on a GPU: a warp or more a row, at
    most 256 work-items a group), the other knobs as in `base`."""
    from runtime.backends.opencl_tuning import candidates

    shapes = [replace(p, **{k: v for k, v in asdict(base).items() if k not in ("LWS", "RPW")})
              for p in candidates(dev)]
    if not dev.is_cpu:
        shapes = [p for p in shapes if p.LWS >= 16 and p.RPW <= 4]
    return shapes


def sweep(dev: Any, base: Any, int8: bool, measure: Any) -> None:
    """--sweep on a GPU, for Q4_0/Q8_0 (planes, int8 activations): loads in flight (QU) x warp
    shuffles (SHFL) at the default shape, then dp4a off, then the shape grid at the best of
    those, then the file's layout at the best (what streamed layers run). Elsewhere the grid."""
    if dev.is_cpu or not int8:
        for p in grid(dev, base):
            measure(p)
        return
    first = [measure(replace(base, QU=qu, SHFL=sh)) for qu in (1, 2, 4, 8) for sh in (0, 1)]
    best = max((r for r in first if r and r["ok"]), key=lambda r: r["GB/s"], default=None)
    best_p = replace(base, **{k: best["params"][k] for k in ("QU", "SHFL")}) if best else base
    measure(replace(best_p, DP4A=1 - best_p.DP4A))
    for p in grid(dev, best_p):
        if p != best_p:
            measure(p)
    measure(best_p, repack=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["gpu", "cpu", "any"], default="any")
    ap.add_argument("--types", default="q8_0,q4_0,q4_k,q6_k,f16")
    ap.add_argument("--rows", type=int, default=14336)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--set", default="", metavar="K=V,...",
                    help="override tuned/default knobs, e.g. SHFL=1,QU=8")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from gguf import GGMLQuantizationType as T

    from runtime.backends.opencl_device import copy_bandwidth, find_device
    from runtime.backends.opencl_kernels import Kernels
    from runtime.backends.opencl_programs import ProgramCache
    from runtime.backends.opencl_tuning import gemv_bandwidth, load_params
    from runtime.backends.weight_stream import Q8_ACTIVATION_TYPES
    from runtime.quant import dequantize, quantize

    try:
        types = [T[t.strip().upper()] for t in args.types.split(",") if t.strip()]
    except KeyError as e:
        print(f"bench_gemv: --types: unknown type {e.args[0]} (expected e.g. q8_0,q4_0)",
              file=sys.stderr)
        return 2
    dev = find_device(kind=args.device)
    programs = ProgramCache(dev)
    base, source = load_params(dev)
    try:
        base = with_knobs(base, args.set)
    except (ValueError, TypeError) as e:
        print(f"bench_gemv: --set {args.set!r}: {e} (expected e.g. SHFL=1,QU=8)", file=sys.stderr)
        return 2
    source += f" with {args.set}" if args.set.strip() else ""
    copy = copy_bandwidth(dev, Kernels(dev, base, programs).ops, 1 << 30)
    w32 = np.random.default_rng(0).standard_normal((args.rows, args.cols)).astype(np.float32)
    rows: list[dict] = []
    for qtype in types:
        raw = quantize(w32, qtype, search=False)  # the speed does not depend on the values
        # x is all ones (exact in Q8_0): each output is its row's sum, checked on every shape
        want = dequantize(raw, qtype, (args.rows, args.cols)).astype(np.float64)
        bound = 1e-4 * np.abs(want).sum(1) + 1e-4
        want = want.sum(1)

        def measure(params: Any, repack: bool = True, qtype: Any = qtype, raw: Any = raw,
                    want: Any = want, bound: Any = bound) -> dict | None:
            try:
                gbs, seconds, y, layout = gemv_bandwidth(dev, params, programs, raw, qtype,
                                                         (args.rows, args.cols), args.repeats,
                                                         repack)
            except Exception as e:  # a shape the device refuses (work-group size, a build)
                err = str(e).strip().splitlines()
                print(f"  {qtype.name} {asdict(params)}: {err[0] if err else e!r}",
                      file=sys.stderr)
                return None
            ok = bool((np.abs(y - want) <= bound).all())
            print(f"  {qtype.name} {layout} {asdict(params)}: {seconds * 1e6:.1f} us, "
                  f"{gbs / 1e9:.1f} GB/s ({gbs / copy:.0%} of copy){'' if ok else ' WRONG'}",
                  file=sys.stderr, flush=True)
            row = {"type": qtype.name, "layout": layout, "shape": " ".join(
                f"{k}={v}" for k, v in asdict(params).items() if k in SHOWN),
                "us": round(seconds * 1e6, 1), "GB/s": round(gbs / 1e9, 1),
                "of_copy": f"{gbs / copy:.0%}", "ratio": round(gbs / copy, 3), "ok": ok,
                "params": asdict(params)}
            rows.append(row)
            return row

        measure(base)
        if args.sweep:
            sweep(dev, base, qtype in Q8_ACTIVATION_TYPES, measure)
    report = {"device": dev.describe(), "params_from": source,
              "copy_gbs": round(copy / 1e9, 1), "matrix": [args.rows, args.cols], "rows": rows}
    if not args.json:
        print(f"{dev.describe()}: copy {copy / 1e9:.1f} GB/s (read + write), params {source}")
    print_report(report, ["type", "layout", "shape", "us", "GB/s", "of_copy", "ok"], args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
