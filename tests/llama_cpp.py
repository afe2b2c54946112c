"""llama.cpp as a peer, through llama-cpp-python in its own venv (it is a benchmark/test-only
dependency, built by bench/compare_llamacpp.py into ~/.cache/clawforge/llamacpp-venv for this
CPU, see bench/llamacpp_venv.py; the LLAMACPP_VENV variable overrides). Each call runs in its
own process and answers JSON.

    python = llama_python()            # None when the venv is absent or stale: skip, saying so
    run_llama(python, "m.gguf", ids, n_greedy=16)   # logits of ids, greedy continuation
    llama_quantize(python, "f16.gguf", "q4_k_m.gguf", "Q4_K_M")   # llama.cpp's quantizer
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import llamacpp_venv

_RUN = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
path, ids = sys.argv[1], json.loads(sys.argv[2])
n_greedy, n_ctx = int(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
            n_threads=2, verbose=False)
out = {"n_vocab": llm.n_vocab()}
if ids:
    llm.eval(ids)
    out["logits"] = np.asarray(llm.scores[:len(ids)], dtype=np.float32).tolist()
    greedy = []
    for _ in range(n_greedy):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        greedy.append(tok)
        llm.eval([tok])
    out["greedy"] = greedy
text = sys.argv[5] if len(sys.argv) > 5 else None
if text is not None:
    out["tokens"] = llm.tokenize(text.encode(), add_bos=True, special=False)
print(json.dumps(out))
"""

_QUANTIZE = r"""
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
params.nthread = 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
"""


def llama_python() -> Path | None:
    """The venv's python when llama_cpp imports there and was built for this CPU, else None."""
    return llamacpp_venv.usable()


def run_llama(python: Path, model: Path, ids: Sequence[int], *, n_greedy: int = 0,
              n_ctx: int = 256, text: str | None = None) -> dict[str, Any]:
    """llama.cpp's logits at each of `ids` (from an empty cache), `n_greedy` greedy tokens
    after them, and its tokenization of `text` (with BOS) when given."""
    args = [str(python), "-c", _RUN, str(model), json.dumps(list(ids)), str(n_greedy),
            str(n_ctx)] + ([text] if text is not None else [])
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"llama.cpp failed on {model}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def llama_quantize(python: Path, src: Path, dst: Path, ftype: str) -> Path:
    """llama.cpp's own quantizer (`llama_model_quantize`), e.g. ftype "Q4_K_M" or "Q8_0"."""
    done = subprocess.run([str(python), "-c", _QUANTIZE, str(src), str(dst), ftype.upper()],
                          capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"llama_model_quantize {ftype} failed: {done.stderr[-2000:]}")
    return dst
