"""Decode's quantized matrix-vector product against the device's own copy bandwidth.

For each weight type, a rows x cols matrix (default 14336 x 4096, a Llama-3-8B FFN matrix) is
multiplied by one token's activations on the OpenCL device, timed by the device's event clock,
with the matrix in enough copies to overflow the device's cache (runtime.backends.opencl_tuning
.gemv_bandwidth). The peer, measured in the same run, is the device's float4 copy kernel
(read + write bytes / s): the ratio is what the `gpu` tier's 80 % target is stated in.
--sweep also times every work-group shape `claw runtime tune` would try (and dp4a on and off),
to show which shape the GPU wants.

    .venv/bin/python bench/bench_gemv.py [--device gpu|cpu|any] [--types q8_0,q4_0,q4_k,q6_k,f16]
                                         [--rows 14336 --cols 4096] [--sweep] [--json]
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

SHOWN = ("LWS", "RPW", "DP4A")  # the knobs a decode matmul's speed depends on


def shapes(dev: Any, base: Any, sweep: bool, int8: bool) -> list[Any]:
    """The default (or tuned) parameters, and with --sweep the tune grid (on a GPU: whole warps;
    for the formats with int8 activations, the default shape with dp4a toggled too)."""
    from runtime.backends.opencl_tuning import candidates

    if not sweep:
        return [base]
    grid = [replace(p, DP4A=base.DP4A) for p in candidates(dev)]
    if not dev.is_cpu:  # a whole warp (or more) per work-group, at most 256 work-items
        grid = [p for p in grid if p.LWS >= 16 and p.RPW <= 4]
        if int8:
            grid.append(replace(base, DP4A=1 - base.DP4A))
    return [base] + [p for p in grid if p != base]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["gpu", "cpu", "any"], default="any")
    ap.add_argument("--types", default="q8_0,q4_0,q4_k,q6_k,f16")
    ap.add_argument("--rows", type=int, default=14336)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from gguf import GGMLQuantizationType as T

    from runtime.backends.opencl_device import copy_bandwidth, find_device
    from runtime.backends.opencl_kernels import Kernels
    from runtime.backends.opencl_programs import ProgramCache
    from runtime.backends.opencl_tuning import gemv_bandwidth, load_params
    from runtime.backends.weight_stream import Q8_ACTIVATION_TYPES
    from runtime.quant import quantize

    try:
        types = [T[t.strip().upper()] for t in args.types.split(",") if t.strip()]
    except KeyError as e:
        print(f"bench_gemv: --types: unknown type {e.args[0]} (expected e.g. q8_0,q4_0)",
              file=sys.stderr)
        return 2
    dev = find_device(kind=args.device)
    programs = ProgramCache(dev)
    base, source = load_params(dev)
    copy = copy_bandwidth(dev, Kernels(dev, base, programs).ops, 1 << 30)
    w32 = np.random.default_rng(0).standard_normal((args.rows, args.cols)).astype(np.float32)
    rows = []
    for qtype in types:
        raw = quantize(w32, qtype)
        for params in shapes(dev, base, args.sweep, qtype in Q8_ACTIVATION_TYPES):
            try:
                gbs, seconds = gemv_bandwidth(dev, params, programs, raw, qtype,
                                              (args.rows, args.cols), args.repeats)
            except Exception as e:  # a shape the device refuses (work-group size, a build)
                err = str(e).strip().splitlines()
                print(f"  {qtype.name} {asdict(params)}: {err[0] if err else e!r}", file=sys.stderr)
                continue
            print(f"  {qtype.name} {asdict(params)}: {seconds * 1e6:.1f} us, {gbs / 1e9:.1f} GB/s "
                  f"({gbs / copy:.0%} of copy)", file=sys.stderr, flush=True)
            rows.append({"type": qtype.name, "shape": " ".join(
                f"{k}={v}" for k, v in asdict(params).items() if k in SHOWN),
                "us": round(seconds * 1e6, 1), "GB/s": round(gbs / 1e9, 1),
                "of_copy": f"{gbs / copy:.0%}", "ratio": round(gbs / copy, 3),
                "params": asdict(params)})
    report = {"device": dev.describe(), "params_from": source,
              "copy_gbs": round(copy / 1e9, 1), "matrix": [args.rows, args.cols], "rows": rows}
    if not args.json:
        print(f"{dev.describe()}: copy {copy / 1e9:.1f} GB/s (read + write), params {source}")
    print_report(report, ["type", "shape", "us", "GB/s", "of_copy"], args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
