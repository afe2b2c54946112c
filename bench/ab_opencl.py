"""Before/after of the OpenCL backend in process CPU time, two source trees alternated.

On a shared machine wall-clock tok/s swings 2-3x with the neighbours' load; the CPU seconds
a forward pass costs this process (PoCL's threads and the host) move far less. Each tree runs
in its own process: load, warm-up, then `--rounds` x (one pp<P> forward, `--gen` greedy decode
steps), and prints the CPU and wall seconds of each, trees alternated round by round.

    .venv/bin/python bench/ab_opencl.py MODEL.gguf BEFORE_TREE AFTER_TREE [-p 512] [-n 16]
        [--rounds 2] [--json]

A tree is a source checkout (e.g. `git archive REV | tar -x -C DIR`); ours is the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import print_report  # noqa: E402

# Runs with PYTHONPATH=<tree>: one round of pp and tg, CPU and wall seconds, as JSON.
RUNNER = r"""
import json, sys, time
import numpy as np
from runtime.backends.opencl_backend import OpenCLBackend
from runtime.model_file import open_model
b = OpenCLBackend(open_model(sys.argv[1]))
n, n_gen, rounds = map(int, sys.argv[2:5])
prompt = [int(t) for t in np.random.default_rng(0).integers(3, b.config.vocab_size, n)]
def pp():
    cache = b.new_cache(n + n_gen + 2); b.forward_device(prompt, cache); b.greedy_next()
    return cache
def tg(cache, k):
    for _ in range(k): b.forward_device([5], cache); b.greedy_next()
tg(pp(), 2)  # warm-up: first launches of every kernel shape
out = []
for _ in range(rounds):
    w, c = time.perf_counter(), time.process_time(); cache = pp()
    row = {"pp_cpu_s": time.process_time() - c, "pp_wall_s": time.perf_counter() - w}
    w, c = time.perf_counter(), time.process_time(); tg(cache, n_gen)
    row.update(tg_cpu_s=time.process_time() - c, tg_wall_s=time.perf_counter() - w)
    out.append(row)
print(json.dumps(out))
"""


def run(tree: Path, args: argparse.Namespace) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(tree), "POCL_MAX_PTHREAD_COUNT": str(args.threads)}
    # cwd = the tree: `python -c` puts the working directory ahead of PYTHONPATH on sys.path
    done = subprocess.run([sys.executable, "-c", RUNNER, str(args.model.resolve()),
                           str(args.prompt), str(args.gen), "1"], capture_output=True, text=True,
                          env=env, cwd=tree)
    if done.returncode:
        raise SystemExit(f"{tree}: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path, nargs="?", default=ROOT)
    ap.add_argument("-p", "--prompt", type=int, default=512)
    ap.add_argument("-n", "--gen", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for i in range(args.rounds):
        for name, tree in (("before", args.before), ("after", args.after)):
            r = run(tree, args)[0]
            rows.append({"round": i + 1, "tree": name, **{k: round(v, 3) for k, v in r.items()},
                         "pp_tps_wall": round(args.prompt / r["pp_wall_s"], 2),
                         "tg_tps_wall": round(args.gen / r["tg_wall_s"], 2)})
    best = {name: {k: min(r[k] for r in rows if r["tree"] == name)
                   for k in ("pp_cpu_s", "tg_cpu_s")} for name in ("before", "after")}
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "model": args.model.name, "prompt": args.prompt, "gen": args.gen, "rows": rows,
              "pp_cpu_speedup": round(best["before"]["pp_cpu_s"] / best["after"]["pp_cpu_s"], 3),
              "tg_cpu_speedup": round(best["before"]["tg_cpu_s"] / best["after"]["tg_cpu_s"], 3)}
    print_report(report, ["round", "tree", "pp_cpu_s", "pp_wall_s", "tg_cpu_s", "tg_wall_s"],
                 args.json)


if __name__ == "__main__":
    main()
