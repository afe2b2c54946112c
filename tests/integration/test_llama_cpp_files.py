"""GGUF files written by llama.cpp's own converter load and run exactly.

llama.cpp's `convert_hf_to_gguf.py` (with its gguf-py) comes from the llama-cpp-python sdist
on PyPI, which vendors llama.cpp's sources; it is pure Python, so no C++ build is needed. A tiny
Llama with a SentencePiece tokenizer is converted to F32, F16 and Q8_0 by it, then run by our
runtime: logits against transformers on the same (dequantized) weights, and our tokenizer,
read from the GGUF metadata llama.cpp wrote, against sentencepiece itself.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from runtime.api import Model  # noqa: E402
from tests.tiny_models import tiny_hf_model  # noqa: E402
from tests.unit import tokenizer_fixtures as fx  # noqa: E402
from tests.unit.test_model import hf_logits, load_reference_weights  # noqa: E402

pytestmark = pytest.mark.integration

SDIST = "llama-cpp-python==0.3.36"
CACHE = Path.home() / ".cache" / "clawforge" / "llama-cpp-python-0.3.36"


def llama_cpp_converter() -> Path:
    """The converter's folder, downloaded once (~75 MB) and kept in the user's cache."""
    script = CACHE / "convert_hf_to_gguf.py"
    if script.exists():
        return CACHE
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    download = CACHE.parent / "sdist"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
                    ":all:", SDIST, "-d", str(download)], check=True, timeout=600)
    (archive,) = download.glob("llama_cpp_python-*.tar.gz")
    with tarfile.open(archive) as tar:
        prefix = tar.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                   and (m.name.endswith(".py") or "/gguf-py/" in m.name)]
        for member in members:
            member.name = member.name[len(prefix):]
        tar.extractall(CACHE, members=members, filter="data")
    return CACHE


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    sp_model = fx.train_sentencepiece()
    sp = fx.sp_processor(sp_model)
    folder = tmp_path_factory.mktemp("hf-sp")
    (folder / "tokenizer.model").write_bytes(sp_model)
    model = tiny_hf_model(vocab_size=sp.get_piece_size(), bos_token_id=sp.bos_id(),
                          eos_token_id=sp.eos_id())
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model, sp


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_files_from_llama_cpp_converter(model_dir, outtype, tmp_path):
    folder, model, sp = model_dir
    converter = llama_cpp_converter()
    out = tmp_path / f"m-{outtype}.gguf"
    done = subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"),
                           str(folder), "--outtype", outtype, "--outfile", str(out)],
                          env={"PYTHONPATH": str(converter / "gguf-py"), "PATH": "/usr/bin:/bin",
                               "HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    ours = Model(out, backend="numpy")
    text = "Hello world, 123 ünïcode 🤖 and code: def f(x):\n    return x  # done"
    ids = ours.tokenize(text)
    assert ids == [sp.bos_id(), *sp.encode(text)]
    assert ours.detokenize(ids[1:]) == sp.decode(ids[1:])
    if outtype == "f32":
        reference = model
    else:
        reference = transformers.LlamaForCausalLM(model.config).eval()
        load_reference_weights(reference, out)
    # Q8_0 products round activations to Q8_0 blocks (as llama.cpp does; transformers
    # multiplies float32): measured 4.7e-3 here, against ~1e-1 for a misread block.
    tol = 1e-2 if outtype == "q8_0" else 1e-4
    assert np.abs(ours.logits(ids) - hf_logits(reference, ids)).max() <= tol
