"""Where an OpenCL forward pass spends its time: one whole step against each kind of kernel
timed alone on the same backend and shapes (best of 3), scaled to the layer count.

    .venv/bin/python bench/profile_opencl.py MODEL.gguf [--tokens 1] [--clock wall|cpu]
    # --tokens 1: decode, N: prefill
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    from runtime.backends.opencl_backend import MATRICES, OpenCLBackend
    from runtime.model_file import open_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this process's CPU seconds (all PoCL threads), steadier than wall "
                         "time on a shared machine")
    args = ap.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    backend = OpenCLBackend(open_model(args.model))
    n, cfg, k, queue = args.tokens, backend.config, backend.kern, backend.dev.queue

    def best(run, repeats: int = 3) -> float:
        run()
        queue.finish()
        times = []
        for _ in range(repeats):
            start = clock()
            run()
            queue.finish()
            times.append(clock() - start)
        return min(times)

    cache = backend.new_cache(n + 1)

    def step() -> None:
        cache.length = 0
        backend.forward_device(list(range(n)), cache)

    total = best(step)
    layer = backend.layers[0]
    x = k.empty(4 * n * cfg.ffn_dim)
    y = k.empty(4 * n * max(cfg.ffn_dim, cfg.vocab_size))
    parts = {}
    for m in MATRICES:
        t = best(lambda m=m: k.matmul(layer[m], x, y, n))
        parts[f"{m} ({layer[m].qtype.name})"] = t * cfg.n_layers
    parts["output head"] = best(lambda: k.matmul(backend.head, x, y, 1))
    parts["attention"] = cfg.n_layers * best(lambda: k.attention(
        backend.q, cache.k[0], cache.v[0], backend.att, backend.part, n, cfg.n_heads,
        cfg.n_kv_heads, cfg.head_dim, 0))
    parts["rms_norm x2"] = 2 * cfg.n_layers * best(lambda: k.rms_norm(
        backend.x, layer["attn_norm"], backend.xn, cfg.dim, n, cfg.norm_eps))
    print(f"{args.model.name}, {n} token(s), {backend.dev.describe()}: step {total * 1e3:.1f} ms "
          f"({args.clock} clock)")
    for name, t in parts.items():
        print(f"  {name:24s} {t * 1e3:8.1f} ms  {t / total:6.1%}")
    rest = total - sum(parts.values())
    print(f"  {'launches, swiglu, rope…':24s} {rest * 1e3:8.1f} ms  {rest / total:6.1%}")


if __name__ == "__main__":
    main()
