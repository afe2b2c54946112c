"""Where a GPU GEMV's time goes besides streaming its weights: the launch itself, and size.

bench_gemv.py states the decode GEMV against the device's copy bandwidth measured over 1 GiB.
A 4096 x 14336 Q8_0 matrix is 62 MB, which an H200 streams in ~15 us: a fixed cost per launch
of a few microseconds is then a large share. This measures, on the device's event clock:
- an empty kernel (what one launch costs with no work);
- pure reads (each work-item sums float4s; what a GEMV does to its weights) and the copy probe,
  over the GEMV's own bytes and over 1 GiB;
- the GEMV (Q8_0, Q4_0) one launch at a time (best of --repeats), back to back (the span of
  --repeats launches in the in-order queue over their count: what decode's chain of launches
  sees), and on a matrix of --scale times the rows (the same kernel with more work per launch).

    .venv/bin/python bench/gemv_overhead.py [--device gpu] [--types q8_0,q4_0] [--set K=V,...]
                                            [--rows 14336 --cols 4096 --scale 4] [--json]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_gemv import with_knobs  # noqa: E402
from bench.report import print_report  # noqa: E402

PROBES = """
kernel void nothing(global float* out) { }
kernel void read_probe(const global float4* src, global float* out, int per_item) {
    const size_t n = get_global_size(0);
    float4 s = 0.0f;
    for (int k = 0; k < per_item; k++) s += src[get_global_id(0) + k * n];
    if (s.x + s.y + s.z + s.w == 12345.0f) out[0] = 1.0f;  // never: keeps the loads
}
"""


def best_event(queue: Any, kernel: Any, gsize: tuple, lsize: tuple | None, repeats: int,
               *args: Any) -> float:
    """The shortest device time of `repeats` launches of a kernel, after one to warm up."""
    from runtime.backends.opencl_device import event_seconds

    kernel.set_args(*args)
    cl = sys.modules["pyopencl"]
    cl.enqueue_nd_range_kernel(queue, kernel, gsize, lsize).wait()
    return min(event_seconds(cl.enqueue_nd_range_kernel(queue, kernel, gsize, lsize))
               for _ in range(repeats))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["gpu", "cpu", "any"], default="gpu")
    ap.add_argument("--types", default="q8_0,q4_0")
    ap.add_argument("--rows", type=int, default=14336)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--set", default="", metavar="K=V,...")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from gguf import GGMLQuantizationType as T

    from runtime.backends.opencl_device import find_device, profiling_queue
    from runtime.backends.opencl_kernels import Kernels
    from runtime.backends.opencl_programs import ProgramCache
    from runtime.backends.opencl_tuning import load_params
    from runtime.quant import quantize

    dev = find_device(kind=args.device)
    params, _ = load_params(dev)
    try:
        params = with_knobs(params, args.set)
    except (ValueError, TypeError) as e:
        print(f"gemv_overhead: --set {args.set!r}: {e} (expected e.g. SHFL=1,QU=8)",
              file=sys.stderr)
        return 2
    cl, queue = dev.cl, profiling_queue(dev)
    prog = cl.Program(dev.context, PROBES).build()
    mf = cl.mem_flags
    out = cl.Buffer(dev.context, mf.READ_WRITE, 4)
    kern = Kernels(replace(dev, queue=queue), params, ProgramCache(dev))
    ops = kern.ops
    rows: list[dict] = []

    def row(what: str, nbytes: int, seconds: float, moved: int | None = None) -> None:
        moved = nbytes if moved is None else moved
        rows.append({"what": what, "MB": round(nbytes / 1e6, 1), "us": round(seconds * 1e6, 1),
                     "GB/s": round(moved / seconds / 1e9, 1)})
        print(f"  {what}: {seconds * 1e6:.1f} us, {moved / seconds / 1e9:.1f} GB/s",
              file=sys.stderr, flush=True)

    row("empty kernel (1 work-group)", 0,
        best_event(queue, cl.Kernel(prog, "nothing"), (64,), (64,), args.repeats, out), 0)
    matrix = args.rows * args.cols * 34 // 32  # the Q8_0 matrix's bytes
    for nbytes in (matrix, 1 << 30):
        src = cl.Buffer(dev.context, mf.READ_WRITE, nbytes)
        cl.enqueue_fill_buffer(queue, src, np.float32(1.0), 0, nbytes)
        dst = cl.Buffer(dev.context, mf.READ_WRITE, nbytes)
        per_item = 8  # float4s a work-item reads, a grid's width apart
        row(f"read probe, {nbytes / 1e6:.0f} MB", nbytes, best_event(
            queue, cl.Kernel(prog, "read_probe"), (nbytes // 16 // per_item // 256 * 256,),
            (256,), args.repeats, src, out, np.int32(per_item)))
        row(f"copy probe, {nbytes / 1e6:.0f} MB (read + write)", nbytes, best_event(
            queue, cl.Kernel(ops, "copy_probe"), (nbytes // 16,), None, args.repeats, src, dst),
            2 * nbytes)
        src.release()
        dst.release()

    w32 = np.random.default_rng(0).standard_normal((args.rows, args.cols)).astype(np.float32)
    x = kern.upload(np.ones(args.cols, np.float32))
    y = kern.empty(4 * args.rows * args.scale)
    for name in args.types.split(","):
        qtype = T[name.strip().upper()]
        raw = quantize(w32, qtype, search=False)
        q8 = kern.quantize_q8(x, args.cols, 1)
        for scale in (1, args.scale):
            big = np.tile(raw.reshape(args.rows, -1), (scale, 1))
            shape = (args.rows * scale, args.cols)
            copies = max(2, -(-(256 << 20) // big.nbytes))
            mats = [kern.upload_matrix(big, qtype, shape) for _ in range(copies)]
            launches = []
            for i in range(args.repeats + copies):
                kern.matmul(mats[i % copies], x, y, 1, q8=q8)
                launches.append(kern.last_event)
            queue.finish()
            timed = launches[copies:]
            one = min((e.profile.end - e.profile.start) * 1e-9 for e in timed)
            span = (timed[-1].profile.end - timed[0].profile.start) * 1e-9 / len(timed)
            label = f"{qtype.name} GEMV {shape[0]}x{shape[1]} ({mats[0].layout_name})"
            row(f"{label}, one launch", big.nbytes, one)
            row(f"{label}, back to back", big.nbytes, span)
            for m in mats:
                m.parts[0][2].release()
    report = {"device": dev.describe(), "params": str(params), "rows": rows}
    print_report(report, ["what", "MB", "us", "GB/s"], args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
