"""Bytes, bits per weight and perplexity of each quantization of one trained model: our mixed
precision against our uniform types and against llama.cpp's own quantizer at the same sizes.

The model is tests/trained_model.py's tiny Llama (--model small: 2 layers, width 256, 1.4 M
weights, GPL-2 held out; --model large, bench only: 3 layers, width 512, 7.2 M weights, GPL-2,
LGPL-2.1 and GFDL-1.2 held out; 512-token BPE, trained on Debian's licence texts; cached).
Perplexity and KL(F16 || file) are measured by our runtime on the held-out text
(non-overlapping windows of --ctx tokens, second half scored, as llama-perplexity does), the
same tokens for every file. llama.cpp's files come from `llama_model_quantize` without an
importance matrix (llama-cpp-python, its own venv; skipped with a note when absent). Our mixed
plans are measured twice (sensitivity on the calibration slice of the training text: once
with the encoders the quantizer uses by default, error-compensated levels under the
calibration inputs' Gram matrices (GPTQ) with importance-weighted scales; once with the
importance-weighted scales and levels rounded to nearest) and planned for each size: a fifth
of the F32 file (the issue's goal) and the size of each llama.cpp file (the "same size"
comparison, as paired perplexity ratios: ours+gptq and ours+imatrix against llama.cpp, and
ours+gptq against ours+imatrix; then each pair over all the sizes at once, every token's
log-ratio averaged over the sizes, whose paired standard error counts that the sizes score
the same tokens).

    .venv/bin/python bench/bench_quant.py [--model small|large] [--ctx 128]
        [--llama q8_0,q6_k,q5_k_m,q4_k_m,q4_0] [--no-uniform] [--uniform-imx]
        [--uniform-gptq] [--eval-chars N] [--json]
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

import numpy as np  # noqa: E402
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
    ap.add_argument("--model", choices=("small", "large"), default="small")
    ap.add_argument("--no-uniform", action="store_true",
                    help="skip our uniform files and the F32 row (time)")
    ap.add_argument("--uniform-imx", action="store_true",
                    help="add our uniform types encoded with the importance matrix")
    ap.add_argument("--uniform-gptq", action="store_true",
                    help="add our uniform types encoded with GPTQ (and the importance matrix)")
    ap.add_argument("--eval-chars", type=int, default=None,
                    help="score only this many characters of the held-out text (time)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    why = tm.available()
    if why:
        raise SystemExit(f"bench_quant: {why}")
    model = tm.trained_model(tm.LARGE_SETTINGS if args.model == "large" else None)
    cache = CACHE / args.model
    cache.mkdir(parents=True, exist_ok=True)
    f32_bytes, f16_bytes = model.f32.stat().st_size, model.f16.stat().st_size
    files: list[tuple[str, str, Path]] = [("F32", "reference", model.f32),
                                          ("F16", "reference", model.f16)][args.no_uniform:]
    with tempfile.TemporaryDirectory() as tmp:
        src = mq.open_float_source(model.f16, Path(tmp))
        weights = mq.float_weights(src)
        for qtype in () if args.no_uniform else UNIFORM:
            out = mq.write(src, weights, mq.uniform_types(src, qtype),
                           cache / f"ours-{qtype.name.lower()}.gguf")
            files.append((qtype.name, "ours uniform", out))
        python = llama_python()
        llama_files = []
        if python is None:
            print("llama-cpp-python not found: no llama.cpp rows", file=sys.stderr)
        else:
            for ftype in args.llama.split(","):
                out = llama_quantize(python, model.f16, cache / f"llama-{ftype}.gguf", ftype)
                files.append((ftype.upper(), "llama.cpp", out))
                llama_files.append((ftype.upper(), out))
        ids = mq.calibration_ids(src, model.calibration_text.read_text(), 256, "calibration")
        t = time.perf_counter()
        stats = mq.calibration_stats(src, weights, mq.calibration_ids(
            src, model.calibration_text.read_text(), None, "calibration"), grams=True)
        importance, grams = stats.importance, stats.grams
        imatrix_s = time.perf_counter() - t
        extra = mq.imatrix_metadata(model.calibration_text.name, importance)
        for tag, grm, wanted in (("imx", None, args.uniform_imx),
                                 ("gptq", grams, args.uniform_gptq)):
            for qtype in UNIFORM if wanted else ():  # the encoders' gain alone
                out = mq.write(src, weights, mq.uniform_types(src, qtype),
                               cache / f"ours-{tag}-{qtype.name.lower()}.gguf", importance,
                               extra, grm)
                files.append((f"{qtype.name}+{tag}", f"ours uniform+{tag}", out))
        measure_s = {}
        targets = [("0.2×F32", f32_bytes // 5)] + [(f"={name}", out.stat().st_size)
                                                  for name, out in llama_files]
        header = mq.header_bytes(src, extra)
        for tag, grm in (("mixed+gptq", grams), ("mixed+imx", None)):
            t = time.perf_counter()
            probe = mq.make_plan(src, max_bytes=f16_bytes, header_bytes=header)
            mq.measure_sensitivity(src, weights, probe.tensors, ids, importance=importance,
                                   grams=grm)
            measure_s[tag] = round(time.perf_counter() - t, 1)
            for label, limit in targets if grm is not None else targets[1:]:
                plan = mq.make_plan(src, max_bytes=limit, header_bytes=header)
                for p, measured in zip(plan.tensors, probe.tensors, strict=True):
                    p.loss = measured.loss
                mq.choose(plan.tensors, plan.choice_budget)
                name = f"{tag}-{label.strip('=×.').replace('×', 'x')}".replace("+", "-")
                out = mq.write(src, weights, {p.name: p.choice for p in plan.tensors},
                               cache / f"{name}.gguf", importance, extra, grm)
                files.append((f"{tag} {label}", "ours " + tag, out))

    text = model.eval_text.read_text()[:args.eval_chars]
    rows = []
    evals = {}
    base, scored = None, 0
    base_cache: dict = {}  # the F16 logits of each window, computed once for every file
    t = time.perf_counter()
    for name, method, path in files:
        src = open_model(path)
        n_weights = src.n_params()
        tensor_bytes = sum(r.nbytes for r in src.tensors.values())
        ev = evaluate(str(path), text, n_ctx=args.ctx, base_cache=base_cache,
                      base_path=str(model.f16))  # F16 against itself: its logits, cached
        evals[name] = ev
        if name == "F16":
            base, scored = ev.ppl, ev.tokens_scored
        size = path.stat().st_size
        rows.append({"file": name, "method": method, "bytes": size,
                     "x_f32": round(size / f32_bytes, 4), "x_f16": round(size / f16_bytes, 4),
                     "bpw": round(8 * tensor_bytes / n_weights, 3), "ppl": round(ev.ppl, 4),
                     "ppl_err": round(ev.ppl_error, 4), "kl_vs_f16": None if name == "F16"
                     else round(ev.kl_mean, 6), "top1_vs_f16": ev.top1_agree})
    for row in rows:
        row["dppl_vs_f16_pct"] = round(100 * (row["ppl"] / base - 1), 3)
    eval_s = time.perf_counter() - t
    by_name = {r["file"]: r for r in rows}
    comparisons = []
    pairs = [("mixed+gptq", "llama"), ("mixed+imx", "llama"), ("mixed+gptq", "mixed+imx")]
    curve: dict[tuple[str, str], list[np.ndarray]] = {pair: [] for pair in pairs}
    for name, _ in [] if python is None else llama_files:
        for a_tag, b_tag in pairs:
            a_file, b_file = (f"{tag} ={name}" if tag != "llama" else name
                              for tag in (a_tag, b_tag))
            a, b = by_name[a_file], by_name[b_file]
            # the same tokens scored by both files: ln(ppl ratio) +- its paired standard error
            log_ratio, err = paired_log_ratio(evals[a_file], evals[b_file])
            curve[a_tag, b_tag].append(evals[a_file].token_nll - evals[b_file].token_nll)
            comparisons.append({
                "size_of": name, "a": a_tag, "b": b_tag, "a_bytes": a["bytes"],
                "b_bytes": b["bytes"], "a_ppl": a["ppl"], "b_ppl": b["ppl"],
                "ppl_ratio": round(evals[a_file].ppl / evals[b_file].ppl, 5),
                "a_kl": a["kl_vs_f16"], "b_kl": b["kl_vs_f16"],
                "kl_ratio": round(a["kl_vs_f16"] / b["kl_vs_f16"], 3),
                "ln_ppl_ratio": round(log_ratio, 6), "ln_ppl_ratio_se": round(err, 6),
                "z": round(log_ratio / err, 2) if err else None})
    # the whole size curve at once: each token's NLL difference averaged over the sizes, so
    # that the standard error counts the sizes' shared tokens (their errors correlate)
    for (a_tag, b_tag), diffs in curve.items():
        if diffs:
            mean = np.mean(diffs, axis=0)
            log_ratio, err = float(mean.mean()), float(mean.std() / np.sqrt(len(mean) - 1))
            comparisons.append({"size_of": f"all {len(diffs)} (mean)", "a": a_tag, "b": b_tag,
                                "ln_ppl_ratio": round(log_ratio, 6),
                                "ln_ppl_ratio_se": round(err, 6),
                                "z": round(log_ratio / err, 2) if err else None})
    report = {"bench": "quant", "date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
              "model": f"{args.model}: {model.hf_dir.parent}",
              "eval_text": ", ".join(tm.LARGE_SETTINGS["held_out"]) + " (held out)"
              if args.model == "large" else "GPL-2 (held out)",
              "eval_chars": args.eval_chars, "ctx": args.ctx, "tokens_scored": scored,
              "imatrix_s": round(imatrix_s, 1),
              "sensitivity_s": measure_s, "eval_s": round(eval_s, 1),
              "rows": rows, "same_size": comparisons}
    goal = by_name["mixed+gptq 0.2×F32"]
    report["goal"] = {"x_f32": goal["x_f32"], "dppl_vs_f16_pct": goal["dppl_vs_f16_pct"],
                      "met": goal["x_f32"] <= 0.2 and goal["dppl_vs_f16_pct"] <= 1.0}
    print_report(report, ["file", "method", "bytes", "x_f32", "x_f16", "bpw", "ppl",
                          "dppl_vs_f16_pct", "kl_vs_f16"], args.json)
    if not args.json:
        for c in comparisons:
            what = (f"ppl {c['a_ppl']} vs {c['b_ppl']} = {c['ppl_ratio']}x, KL vs F16 "
                    f"{c['a_kl']} vs {c['b_kl']} = {c['kl_ratio']}x; " if "a_ppl" in c else "")
            print(f"size of llama.cpp {c['size_of']}: {c['a']} vs {c['b']}: {what}ln(ppl ratio) "
                  f"{c['ln_ppl_ratio']:+.5f} ± {c['ln_ppl_ratio_se']:.5f} (paired SE, z {c['z']})")


if __name__ == "__main__":
    main()
