"""Our runtime against llama.cpp on the same GGUF files, in the same run, same thread count.

The ~0.5B Llama-shaped random-weight model of bench_numpy.py (hidden 896, 24 layers, 14/2
heads, FFN 4864, vocab 32000; `--model 0.5b-k`: hidden 1024, FFN 4096, 16/4 heads, every row a
multiple of 256, so that Q4_K_M is Q4_K/Q6_K throughout) is written as Q8_0 and Q4_0 by our
converter, and as Q4_K_M (and, asked for, Q5_K_M) by llama.cpp's own quantizer
(llama_model_quantize from the F16 file). Each file is run by `claw runtime bench` (our
backend, its own process) and by llama.cpp through llama-cpp-python (its own process), pp<P>
and tg<N> tokens/s, and the table prints our speed as a ratio of llama.cpp's.

llama-cpp-python is a benchmark-only dependency, built from source in its own venv outside
the repository (~9 min on 2 cores), with explicit CPU flags for this host (its native build
crashes on an AMX path; bench/llamacpp_venv.py). The script builds it when missing or built
for another CPU:

    .venv/bin/python bench/compare_llamacpp.py [--backend opencl] [-p 512] [-n 128] [-r 5]
        [--threads 2] [--types q8_0,q4_0,q4_k_m[,q5_k_m]] [--model 0.5b|0.5b-k] [--baseline DIR]
        [--json]

--baseline DIR also runs our runtime from another source tree (e.g. `git archive REV | tar -x
-C DIR`) in the same run, before ours, so that a change is measured beside its parent under the
same load as a before/after pair of ratios.

LLAMACPP_VENV overrides the venv (default ~/.cache/clawforge/llamacpp-venv).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import llamacpp_venv  # noqa: E402
from bench.bench_numpy import CACHE, SHAPES, make_hf_model  # noqa: E402
from bench.report import print_report  # noqa: E402

# Runs inside the llama-cpp-python venv: pp and tg of one file, as JSON on stdout.
LLAMA_RUNNER = r"""
import json, statistics, sys, time
import numpy as np
from llama_cpp import Llama
path, n_prompt, n_gen, repeats, threads = sys.argv[1], *map(int, sys.argv[2:6])
t0 = time.perf_counter()
# n_batch: the rows of llm.scores (the last token's logits are read there, up to n_ctx); the
# prompt still runs as one ubatch of n_prompt
llm = Llama(model_path=path, n_ctx=n_prompt + n_gen + 8, n_batch=n_prompt + n_gen + 8,
            n_ubatch=n_prompt, n_threads=threads, n_threads_batch=threads, verbose=False)
load = time.perf_counter() - t0
prompt = [int(t) for t in np.random.default_rng(0).integers(3, llm.n_vocab(), n_prompt)]
llm.eval(prompt[:8]); llm.reset()
pp, tg = [], []
for _ in range(repeats):
    llm.reset(); llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
    t = time.perf_counter(); llm.eval(prompt); pp.append(n_prompt / (time.perf_counter() - t))
    llm.reset(); llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
    tok = 1
    t = time.perf_counter()
    for _ in range(n_gen):
        llm.eval([tok]); tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    tg.append(n_gen / (time.perf_counter() - t))
sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
print(json.dumps({"pp": statistics.mean(pp), "pp_sd": sd(pp), "tg": statistics.mean(tg),
                  "tg_sd": sd(tg), "load_s": load}))
"""

QUANTIZER = r"""
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3].upper())
params.nthread = 2
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params)
sys.exit(rc)
"""


def vocabulary(model: str) -> dict:
    """A stand-in byte-level BPE vocabulary (llama.cpp refuses a file without one): distinct
    tokens, one merge. Neither runtime tokenizes here; both run token ids."""
    n = SHAPES[model]["vocab_size"]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": [f"t{i}" for i in range(n)],
            "tokenizer.ggml.token_type": [1] * n, "tokenizer.ggml.merges": ["t 0"],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}


LLAMA_QUANTIZED = ("q4_k_m", "q5_k_m")  # the kinds llama.cpp's quantizer writes here


def model_file(kind: str, python: Path, model: str = "0.5b") -> Path:
    """Q8_0 and Q4_0 written by our converter, the K mixes by llama.cpp's quantizer from F16."""
    from gguf import GGMLQuantizationType as T

    from runtime.convert import convert

    out = CACHE / f"llama-{model}-vocab-{kind}.gguf"
    if out.exists():
        return out
    if kind in LLAMA_QUANTIZED:
        done = subprocess.run([str(python), "-c", QUANTIZER,
                               str(model_file("f16", python, model)), str(out), kind],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"llama_model_quantize failed: {done.stderr[-2000:]}")
        return out
    return convert(make_hf_model(model), out, T[kind.upper()],
                   tokenizer_metadata=vocabulary(model))


def run_llamacpp(python: Path, path: Path, args: argparse.Namespace) -> dict:
    done = subprocess.run([str(python), "-c", LLAMA_RUNNER, str(path), str(args.prompt),
                           str(args.gen), str(args.repeats), str(args.threads)],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"llama.cpp run of {path.name} failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_ours(path: Path, args: argparse.Namespace, root: Path = ROOT) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root), "POCL_MAX_PTHREAD_COUNT": str(args.threads),
           "OMP_NUM_THREADS": str(args.threads)}
    claw = Path(sys.executable).parent / "claw"
    done = subprocess.run([str(claw), "runtime", "bench", str(path),
                           "--backend", args.backend, "-p", str(args.prompt), "-n",
                           str(args.gen), "-r", str(args.repeats), "--json"],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise SystemExit(f"claw runtime bench failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="opencl")
    ap.add_argument("-p", "--prompt", type=int, default=512)
    ap.add_argument("-n", "--gen", type=int, default=128)
    ap.add_argument("-r", "--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="q8_0,q4_0,q4_k_m")
    ap.add_argument("--model", choices=sorted(SHAPES), default="0.5b",
                    help="0.5b-k: rows a multiple of 256, so Q4_K_M is K-quants throughout")
    ap.add_argument("--baseline", type=Path, help="another source tree of ours to run too")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    python = llamacpp_venv.build()
    rows = []
    for kind in args.types.split(","):
        path = model_file(kind, python, args.model)
        before = run_ours(path, args, args.baseline) if args.baseline else None
        ours = run_ours(path, args)
        peer = run_llamacpp(python, path, args)
        pp, tg = (r["tps_mean"] for r in ours["rows"])
        old = [r["tps_mean"] for r in before["rows"]] if before else [None, None]
        for test, mine, was, theirs, sd in (
                (f"pp{args.prompt}", pp, old[0], peer["pp"], peer["pp_sd"]),
                (f"tg{args.gen}", tg, old[1], peer["tg"], peer["tg_sd"])):
            row = {"type": kind, "test": test, "ours_tps": round(mine, 2),
                   "llamacpp_tps": f"{theirs:.2f} ± {sd:.2f}", "ratio": round(mine / theirs, 3)}
            if was is not None:
                row.update(baseline_tps=round(was, 2), baseline_ratio=round(was / theirs, 3))
            rows.append(row)
        rows[-1].update({"decode_gbs": ours["decode_bandwidth_gbs"],
                         "device_copy_gbs": ours["device_copy_bandwidth_gbs"],
                         "peak_rss_mib": ours["peak_rss_mib"]})
        was = f", baseline {old[0]:.2f}/{old[1]:.2f}" if before else ""
        print(f"{kind}: ours {pp:.2f}/{tg:.2f}{was} vs llama.cpp {peer['pp']:.2f}/"
              f"{peer['tg']:.2f} (pp/tg tok/s)", file=sys.stderr, flush=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "backend": args.backend,
              "model": args.model, "threads": args.threads, "prompt": args.prompt, "gen": args.gen,
              "repeats": args.repeats, "rows": rows}
    columns = ["type", "test", "ours_tps", "llamacpp_tps", "ratio"]
    if args.baseline:
        report["baseline"] = str(args.baseline)
        columns[2:2] = ["baseline_tps"]
        columns.append("baseline_ratio")
    print_report(report, columns, args.json)


if __name__ == "__main__":
    main()
