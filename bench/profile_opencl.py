"""Where an OpenCL forward pass spends its time: each kernel's device time inside one real step.

The step runs on a profiling queue and every launch's event is read: per kernel, how many
launches and how much device time; for the step, its span from the first launch's start to
the last one's end and the idle time between launches (what the device waits for the host or
for PoCL to hand over). Decode steps are the replayed recording the backend uses; a prefill
step (--tokens N > 1) is launched directly.

    .venv/bin/python bench/profile_opencl.py MODEL.gguf [--tokens 1] [--context 16] [--json]
    # --tokens 1: a decode step at position --context; N: an N-token prefill
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import print_report  # noqa: E402


def step_events(backend: Any, n_tok: int, context: int) -> list[tuple[str, Any]]:
    """(kernel name, event) for each launch of one step, after a warm-up step of its shape."""
    from runtime.backends.opencl_backend import OpenCLBackend

    assert isinstance(backend, OpenCLBackend)
    cache = backend.new_cache(context + n_tok + 2)
    events: list[tuple[str, Any]] = []
    if n_tok == 1:
        backend.forward(list(range(1, context + 1)), cache)
        pos = cache.length
        backend.forward([5], cache)  # records the step at this position, and runs it
        backend.dev.queue.finish()
        cache.recorded[1].replay(pos, events)  # the same step again (token 5 still in place)
    else:
        kern = backend.kern
        backend.forward(list(range(n_tok)), cache)  # warm-up: first launches of each shape
        cache.length = 0

        def launch(program: Any, name: str, gsize: tuple, lsize: Any, *args: Any) -> None:
            events.append((name, kern.k(program, name)(kern.queue, gsize, lsize, *args)))

        kern.launch = launch
        backend.forward(list(range(n_tok)), cache)
        del kern.launch
    backend.dev.queue.finish()
    return events


def main() -> None:
    import pyopencl as cl

    from runtime.backends.opencl_backend import OpenCLBackend
    from runtime.backends.opencl_device import find_device
    from runtime.model_file import open_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--context", type=int, default=16, help="decode: the step's position")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    dev = find_device()
    dev.queue = cl.CommandQueue(dev.context, dev.device,
                                properties=cl.command_queue_properties.PROFILING_ENABLE)
    backend = OpenCLBackend(open_model(args.model), device=dev)
    events = step_events(backend, args.tokens, args.context)
    times: dict[str, list[float]] = defaultdict(list)
    idle, last_end = 0.0, None
    for name, event in events:
        start, end = event.profile.start, event.profile.end
        times[name].append((end - start) * 1e-6)
        if last_end is not None:
            idle += max(0, start - last_end) * 1e-6
        last_end = end
    span = (events[-1][1].profile.end - events[0][1].profile.start) * 1e-6
    rows = [{"kernel": name, "launches": len(t), "device_ms": round(sum(t), 3),
             "us_each": round(1e3 * sum(t) / len(t), 1), "share": f"{sum(t) / span:.1%}"}
            for name, t in sorted(times.items(), key=lambda kv: -sum(kv[1]))]
    rows.append({"kernel": "(idle between launches)", "launches": len(events) - 1,
                 "device_ms": round(idle, 3), "us_each": round(1e3 * idle / len(events), 1),
                 "share": f"{idle / span:.1%}"})
    report = {"model": args.model.name, "device": dev.describe(), "tokens": args.tokens,
              "context": args.context if args.tokens == 1 else 0, "launches": len(events),
              "span_ms": round(span, 3), "rows": rows}
    if not args.json:
        print(f"{args.model.name}, {args.tokens} token(s), {dev.describe()}: "
              f"{len(events)} launches over {span:.2f} ms")
    print_report(report, ["kernel", "launches", "device_ms", "us_each", "share"], args.json)


if __name__ == "__main__":
    main()
