"""Bytes, bits per weight and perplexity of each quantization of one trained model: our mixed
precision against our uniform types and against llama.cpp's own quantizer at the same sizes.

The model is tests/trained_model.py's tiny Llama (2 layers, width 256, 512-token BPE, trained
on Debian's licence texts; cached). Perplexity and KL(F16 || file) are measured by our runtime
on the held-out GPL-2 text (non-overlapping windows of --ctx tokens, second half scored, as
llama-perplexity does), the same tokens for every file. llama.cpp's files come from
`llama_model_quantize` (llama-cpp-python, its own venv; skipped with a note when absent).
Our mixed plans are measured once (sensitivity on the calibration slice of the training text)
and planned for each size: a fifth of the F32 file (the issue's goal) and the size of each
llama.cpp file (the "same size" comparison, as a ratio of perplexities).

    .venv/bin/python bench/bench_quant.py [--ctx 128] [--llama q8_0,q6_k,q5_k_m,q4_k_m,q4_0]
        [--json]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gguf import GGMLQuantizationType as T  # noqa: E402

from bench.report import print_report  # noqa: E402
from runtime import mixed_quant as mq  # noqa: E402
from runtime.model_file import open_model  # noqa: E402
from runtime.perplexity import evaluate, paired_log_ratio  # noqa: E402
from tests import trained_model as tm  # noqa: E402
from tests.llama_cpp import llama_python, llama_quantize  # noqa: E402

CACHE = ROOT / "bench" / ".cache" / "quant"
UNIFORM = (T.Q8_0, T.Q6_K, T.Q5_K, T.Q4_K, T.Q4_0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--llama", default="q8_0,q6_k,q5_k_m,q4_k_m,q4_0")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    why = tm.available()
    if why:
        raise SystemExit(f"bench_quant: {why}")
    model = tm.trained_model()
    CACHE.mkdir(parents=True, exist_ok=True)
    f32_bytes, f16_bytes = model.f32.stat().st_size, model.f16.stat().st_size
    files: list[tuple[str, str, Path]] = [("F32", "reference", model.f32),
                                          ("F16", "reference", model.f16)]
    with tempfile.TemporaryDirectory() as tmp:
        src = mq.open_float_source(model.f16, Path(tmp))
        weights = mq.float_weights(src)
        for qtype in UNIFORM:
            out = mq.write(src, weights, mq.uniform_types(src, qtype),
                           CACHE / f"ours-{qtype.name.lower()}.gguf")
            files.append((qtype.name, "ours uniform", out))
        python = llama_python()
        llama_files = []
        if python is None:
            print("llama-cpp-python not found: no llama.cpp rows", file=sys.stderr)
        else:
            for ftype in args.llama.split(","):
                out = llama_quantize(python, model.f16, CACHE / f"llama-{ftype}.gguf", ftype)
                files.append((ftype.upper(), "llama.cpp", out))
                llama_files.append((ftype.upper(), out))
        t = time.perf_counter()
        header = mq.header_bytes(src)
        probe = mq.make_plan(src, max_bytes=f16_bytes, header_bytes=header)
        ids = mq.calibration_ids(src, model.calibration_text.read_text(), 256, "calibration")
        mq.measure_sensitivity(src, weights, probe.tensors, ids)
        measure_s = time.perf_counter() - t
        targets = [("0.2×F32", f32_bytes // 5)] + [(f"={name}", out.stat().st_size)
                                                  for name, out in llama_files]
        for label, limit in targets:
            plan = mq.make_plan(src, max_bytes=limit, header_bytes=header)
            for p, measured in zip(plan.tensors, probe.tensors, strict=True):
                p.loss = measured.loss
            mq.choose(plan.tensors, plan.choice_budget)
            out = mq.write(src, weights, {p.name: p.choice for p in plan.tensors},
                           CACHE / f"mixed-{label.strip('=×.').replace('×', 'x')}.gguf")
            files.append((f"mixed {label}", "ours mixed", out))

    text = model.eval_text.read_text()
    rows = []
    evals = {}
    base, scored = None, 0
    for name, method, path in files:
        src = open_model(path)
        n_weights = src.n_params()
        tensor_bytes = sum(r.nbytes for r in src.tensors.values())
        ev = evaluate(str(path), text, n_ctx=args.ctx,
                      base_path=None if name == "F16" else str(model.f16))
        evals[name] = ev
        if name == "F16":
            base, scored = ev.ppl, ev.tokens_scored
        size = path.stat().st_size
        rows.append({"file": name, "method": method, "bytes": size,
                     "x_f32": round(size / f32_bytes, 4), "x_f16": round(size / f16_bytes, 4),
                     "bpw": round(8 * tensor_bytes / n_weights, 3), "ppl": round(ev.ppl, 4),
                     "ppl_err": round(ev.ppl_error, 4), "kl_vs_f16": None if ev.kl_mean is None
                     else round(ev.kl_mean, 6), "top1_vs_f16": ev.top1_agree})
    for row in rows:
        row["dppl_vs_f16_pct"] = round(100 * (row["ppl"] / base - 1), 3)
    by_name = {r["file"]: r for r in rows}
    comparisons = []
    for name, _ in [] if python is None else llama_files:
        ours, theirs = by_name[f"mixed ={name}"], by_name[name]
        comparisons.append({"size_of": name, "mixed_bytes": ours["bytes"],
                            "llama_bytes": theirs["bytes"], "mixed_ppl": ours["ppl"],
                            "llama_ppl": theirs["ppl"],
                            "ppl_ratio_mixed_over_llama": round(ours["ppl"] / theirs["ppl"], 4),
                            "mixed_kl": ours["kl_vs_f16"], "llama_kl": theirs["kl_vs_f16"],
                            "kl_ratio_mixed_over_llama":
                                round(ours["kl_vs_f16"] / theirs["kl_vs_f16"], 3)})
        # the same tokens scored by both files: ln(ppl ratio) +- its paired standard error
        log_ratio, err = paired_log_ratio(evals[f"mixed ={name}"], evals[name])
        comparisons[-1].update({"ln_ppl_ratio": round(log_ratio, 6), "ln_ppl_ratio_se":
                                round(err, 6), "z": round(log_ratio / err, 2) if err else None})
    report = {"bench": "quant", "date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
              "model": str(model.hf_dir.parent), "eval_text": "GPL-2 (held out)",
              "ctx": args.ctx, "tokens_scored": scored, "sensitivity_s": round(measure_s, 1),
              "rows": rows, "same_size": comparisons}
    goal = by_name["mixed 0.2×F32"]
    report["goal"] = {"x_f32": goal["x_f32"], "dppl_vs_f16_pct": goal["dppl_vs_f16_pct"],
                      "met": goal["x_f32"] <= 0.2 and goal["dppl_vs_f16_pct"] <= 1.0}
    print_report(report, ["file", "method", "bytes", "x_f32", "x_f16", "bpw", "ppl",
                          "dppl_vs_f16_pct", "kl_vs_f16"], args.json)
    if not args.json:
        for c in comparisons:
            print(f"same size as llama.cpp {c['size_of']}: mixed ppl {c['mixed_ppl']} vs "
                  f"{c['llama_ppl']} = {c['ppl_ratio_mixed_over_llama']}x, KL vs F16 "
                  f"{c['mixed_kl']} vs {c['llama_kl']} = {c['kl_ratio_mixed_over_llama']}x; "
                  f"ln(ppl ratio) {c['ln_ppl_ratio']:+.5f} ± {c['ln_ppl_ratio_se']:.5f} (paired "
                  f"SE, z {c['z']})")


if __name__ == "__main__":
    main()
