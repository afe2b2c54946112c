"""Prefill and decode speed of the numpy reference backend, with PyTorch as the peer.

A ~0.5B-parameter Llama-shaped model (hidden 896, 24 layers, 14 query / 2 KV heads, FFN 4864,
vocab 32000) with random weights is made once (cached in bench/.cache), converted to GGUF F16
and Q8_0 by our converter, and run by our numpy backend; transformers (PyTorch, float32, the
same thread count) runs the same weights in the same process as the peer, and the table shows
our speed as a ratio of its speed, since this machine's absolute numbers drift.

    .venv/bin/python bench/bench_numpy.py [--prompt 512] [--gen 32] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import print_report  # noqa: E402

CACHE = ROOT / "bench" / ".cache"
SHAPE = dict(vocab_size=32000, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
             num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
             rms_norm_eps=1e-5, tie_word_embeddings=False)
# The same size with every row a multiple of 256 (hidden 1024, FFN 4096, 16/4 heads), so that
# llama.cpp's K-quant mixes (Q4_K_M) are Q4_K/Q6_K throughout, as in real 1B-70B models; at
# hidden 896 its quantizer falls back to Q5_0/Q8_0 for every matrix but FFN-down.
SHAPES = {"0.5b": SHAPE,
          "0.5b-k": {**SHAPE, "hidden_size": 1024, "intermediate_size": 4096,
                     "num_attention_heads": 16, "num_key_value_heads": 4}}


def make_hf_model(model: str = "0.5b") -> Path:
    """The random-weight Llama of SHAPES[model], saved once as a Hugging Face directory."""
    import torch
    import transformers

    path = CACHE / f"llama-{model}-hf"
    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPES[model]))
    llama.to(torch.float16).save_pretrained(path, safe_serialization=True)
    return path


def make_gguf(hf: Path, qtype_name: str) -> Path:
    from gguf import GGMLQuantizationType as T

    from runtime.convert import convert

    out = CACHE / f"llama-0.5b-{qtype_name.lower()}.gguf"
    if not out.exists():
        convert(hf, out, T[qtype_name])
    return out


def bench_ours(path: Path, prompt: list[int], n_gen: int) -> dict:
    import numpy as np

    from runtime.backends.numpy_backend import NumpyBackend
    from runtime.model_file import open_model

    backend = NumpyBackend(open_model(path))
    warm = backend.new_cache(8)
    backend.forward(prompt[:4], warm)  # dequantize weights into the cache once, untimed
    cache = backend.new_cache(len(prompt) + n_gen + 1)
    start = time.perf_counter()
    logits = backend.forward(prompt, cache)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n_gen):
        logits = backend.forward([int(np.argmax(logits[-1]))], cache)
    decode = time.perf_counter() - start
    return {"prefill_tps": len(prompt) / prefill, "decode_tps": n_gen / decode}


def bench_torch(hf: Path, prompt: list[int], n_gen: int) -> dict:
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        model(ids[:, :4])  # warm-up
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill = time.perf_counter() - start
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(n_gen):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode = time.perf_counter() - start
    return {"prefill_tps": len(prompt) / prefill, "decode_tps": n_gen / decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--gen", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    CACHE.mkdir(parents=True, exist_ok=True)
    hf = make_hf_model()
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 32000, args.prompt)]
    peer = bench_torch(hf, prompt, args.gen)
    rows = []
    for qtype in ("F16", "Q8_0"):
        ours = bench_ours(make_gguf(hf, qtype), prompt, args.gen)
        rows.append({"model": f"llama-0.5b {qtype}", **{k: round(v, 2) for k, v in ours.items()},
                     "torch_prefill_tps": round(peer["prefill_tps"], 2),
                     "torch_decode_tps": round(peer["decode_tps"], 2),
                     "prefill_ratio": round(ours["prefill_tps"] / peer["prefill_tps"], 3),
                     "decode_ratio": round(ours["decode_tps"] / peer["decode_tps"], 3)})
    report = {"bench": "numpy backend vs torch (transformers, float32)",
              "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or
              platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
              "prompt_tokens": args.prompt, "generated_tokens": args.gen,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
              "rows": rows}
    head = ["model", "prefill_tps", "torch_prefill_tps", "prefill_ratio", "decode_tps",
            "torch_decode_tps", "decode_ratio"]
    print_report(report, head, args.json)


if __name__ == "__main__":
    main()
