"""The runtime's self-test: proof that this machine (or container image) can run models.

Two checks, each real and each small enough for a smoke test inside a freshly built image:

* `check_model` writes a tiny seeded random-weight Llama as GGUF (with a SentencePiece-style
  vocabulary of letters and byte tokens, so generated ids decode to text), loads it with
  `runtime.api.Model` on the numpy backend and generates a few tokens.
* `check_opencl` runs a real kernel through pyopencl on the first OpenCL device found and checks
  its result against numpy. It is the one place to extend when more backends are checked.
  An image built with `--opencl none` says so (CLAW_OPENCL=none): there the check is skipped,
  with that reason, instead of failing on a machine that was never meant to have OpenCL.

Needs only the `runtime` extra: numpy, gguf, pyopencl (and an OpenCL ICD for the second check).
"""

from __future__ import annotations

import os
import string
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DIM, FFN, LAYERS, HEADS, KV_HEADS, CTX = 64, 128, 2, 4, 2, 128
SPACE = "\u2581"


@dataclass
class Check:
    name: str
    ok: bool
    seconds: float
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    skipped: str | None = None  # why the check did not run (then ok is True)


def tiny_vocabulary() -> tuple[list[str], list[float], list[int]]:
    """<unk>, <s>, </s>, the 256 byte tokens, then letters and a few words (SentencePiece)."""
    from runtime.tokenizer import BYTE, CONTROL, NORMAL, UNKNOWN

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    pieces = [SPACE, *string.ascii_lowercase, *(SPACE + c for c in string.ascii_lowercase),
              SPACE + "the", SPACE + "edge", SPACE + "claw", "er", "in", "on"]
    tokens += pieces
    types += [NORMAL] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def write_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama GGUF with seeded random weights (std 0.08, so greedy choices are clear),
    written with the converter's own metadata and tensor layout."""
    import gguf

    from runtime.config import ModelConfig
    from runtime.convert import _write_metadata
    from runtime.model_file import expected_shapes

    tokens, scores, types = tiny_vocabulary()
    cfg = ModelConfig(arch="llama", name="clawforge-selftest", vocab_size=len(tokens), dim=DIM,
                      n_layers=LAYERS, n_heads=HEADS, n_kv_heads=KV_HEADS, head_dim=DIM // HEADS,
                      ffn_dim=FFN, norm_eps=1e-5, rope_theta=10000.0, rope_dim=DIM // HEADS,
                      rope_style="normal", context_length=CTX)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "llama")
    _write_metadata(w, cfg, gguf.GGMLQuantizationType.F32, {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0})
    for name, shape in expected_shapes(cfg).items():
        data = np.ones(shape) if name.endswith("norm.weight") else rng.normal(0, 0.08, shape)
        if name == "output.weight":
            data[:259] *= 0.1  # special and byte tokens rarely win: the text is readable
        w.add_tensor(name, data.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def check_model(max_tokens: int = 8) -> Check:
    """Load a tiny model on the numpy backend and generate `max_tokens` greedy tokens."""
    start = time.perf_counter()
    try:
        from runtime.api import Model
        from runtime.sampling import SamplingParams

        with tempfile.TemporaryDirectory(prefix="claw-selftest-") as tmp:
            path = write_tiny_llama(Path(tmp) / "tiny-llama.gguf")
            model = Model(path, backend="numpy")
            generation = model.generate("the claw on the edge",
                                        SamplingParams.greedy(max_tokens=max_tokens))
            text = "".join(generation)
            result = generation.result
        if result.completion_tokens < 1:
            raise RuntimeError("the model generated no tokens")
        return Check("model", True, time.perf_counter() - start, {
            "backend": model.backend.name, "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens, "text": text})
    except Exception as exc:  # reported, not raised: the self-test names what failed
        return Check("model", False, time.perf_counter() - start,
                     error=f"{type(exc).__name__}: {exc}")


SAXPY = """
__kernel void saxpy(const float a, __global const float *x, __global const float *y,
                    __global float *out) {
    const int i = get_global_id(0);
    out[i] = a * x[i] + y[i];
}
"""


def first_opencl_device() -> tuple[Any, Any]:
    """The first platform that has a device, and that device (RuntimeError when none)."""
    import pyopencl as cl

    try:
        platforms = cl.get_platforms()
    except cl.Error as exc:  # no ICD at all: pyopencl reports PLATFORM_NOT_FOUND_KHR
        raise RuntimeError(f"no OpenCL platform ({exc}); install an ICD such as "
                           "pocl-opencl-icd") from None
    for platform in platforms:
        try:
            devices = platform.get_devices()
        except cl.Error:
            continue
        if devices:
            return platform, devices[0]
    raise RuntimeError(f"no OpenCL device on {len(platforms)} platform(s): "
                       f"{', '.join(p.name for p in platforms) or 'none'}")


def check_opencl(n: int = 4096) -> Check:
    """Run saxpy on the first OpenCL device and compare it with numpy."""
    start = time.perf_counter()
    try:
        import pyopencl as cl

        platform, device = first_opencl_device()
        ctx = cl.Context([device])
        queue = cl.CommandQueue(ctx)
        rng = np.random.default_rng(1)
        x, y = rng.standard_normal(n, dtype=np.float32), rng.standard_normal(n, dtype=np.float32)
        a = np.float32(2.5)
        mf = cl.mem_flags
        xb = cl.Buffer(ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=x)
        yb = cl.Buffer(ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=y)
        ob = cl.Buffer(ctx, mf.WRITE_ONLY, x.nbytes)
        cl.Program(ctx, SAXPY).build().saxpy(queue, (n,), None, a, xb, yb, ob)
        out = np.empty_like(x)
        cl.enqueue_copy(queue, out, ob).wait()
        error = float(np.max(np.abs(out - (a * x + y))))
        if not error <= 1e-5:
            raise RuntimeError(f"saxpy on {device.name} differs from numpy by {error:.3g} "
                               "(expected ≤ 1e-5)")
        return Check("opencl", True, time.perf_counter() - start, {
            "platform": platform.name.strip(), "device": device.name.strip(),
            "kernel": "saxpy", "elements": n, "max_abs_error": error})
    except Exception as exc:
        return Check("opencl", False, time.perf_counter() - start,
                     error=f"{type(exc).__name__}: {exc}")


def no_opencl_reason() -> str | None:
    """Why this machine has no OpenCL to check, when it was built that way (else None)."""
    if os.environ.get("CLAW_OPENCL") == "none":
        return ("this image has no OpenCL stack (CLAW_OPENCL=none, built with --opencl none): "
                "the runtime uses the numpy backend")
    return None


def run_selftest(opencl: bool = True) -> list[Check]:
    checks = [check_model()]
    reason = no_opencl_reason() if opencl else None
    if reason:
        checks.append(Check("opencl", True, 0.0, skipped=reason))
    elif opencl:
        checks.append(check_opencl())
    return checks


def as_json(checks: list[Check]) -> dict[str, Any]:
    return {"ok": all(c.ok for c in checks), "checks": [asdict(c) for c in checks]}
