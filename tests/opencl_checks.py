"""Kernel-by-kernel agreement of the OpenCL backend with numpy, written once and run on any
device: PoCL's CPU device in tests/integration, a GPU in the `gpu` tier.

Tolerances (float32 throughout): matmuls |ours - numpy| ≤ 1e-5 · Σ|w||x| per output (rounding
order of the dot product only: both read the same quantized weights and, for quantized weights,
round x to the same Q8_0 blocks (weight_stream.weight_input); a wrong nibble or scale is off by
~1e-1); embedding rows bit-exact; RMSNorm, RoPE, SwiGLU, softmax ≤ 1e-5 relative;
attention ≤ 1e-5; argmax/top-k exact.
"""

from __future__ import annotations

import math

import numpy as np
from gguf import GGMLQuantizationType as T

from runtime.backends.numpy_backend import apply_rope, rms_norm, silu, softmax
from runtime.backends.opencl_device import NoDevice, find_device
from runtime.backends.opencl_kernels import Kernels
from runtime.backends.weight_stream import q8_activations, weight_input
from runtime.quant import dequantize, quantize
from tests.agreement import INT8_LOGIT_TOL, int8_logit_bound  # noqa: F401 (re-exported)

MATMUL_TYPES = [T.F32, T.F16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]
RNG = np.random.default_rng(7)



def cpu_device_or_skip():
    """PoCL's CPU device (installed with the test extra), or pytest.skip saying why not."""
    import pytest

    try:
        return find_device(kind="cpu")
    except NoDevice as e:
        pytest.skip(f"no CPU OpenCL device: {e}")


def weights(qtype: T, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(raw GGUF bytes, what numpy dequantizes them to)."""
    w = RNG.standard_normal((rows, cols)).astype(np.float32)
    raw = (w.view(np.uint8) if qtype == T.F32 else
           w.astype(np.float16).view(np.uint8) if qtype == T.F16 else quantize(w, qtype))
    return raw, dequantize(raw, qtype, (rows, cols))


def check_matmul(kern: Kernels, qtype: T, n_tok: int, rows: int = 37, cols: int = 512) -> None:
    raw, wd = weights(qtype, rows, cols)
    m = kern.upload_matrix(raw, qtype, (rows, cols))
    x = RNG.standard_normal((n_tok, cols)).astype(np.float32)
    y0 = RNG.standard_normal((n_tok, rows)).astype(np.float32)
    y = kern.upload(y0)
    kern.matmul(m, kern.upload(x), y, n_tok, accumulate=True)
    x = weight_input(x, qtype)  # what numpy multiplies (Q8_0-rounded unless F32/F16)
    ours, ref = kern.read(y, (n_tok, rows)), y0 + x @ wd.T
    bound = 1e-5 * (np.abs(x) @ np.abs(wd).T) + 1e-6
    assert (np.abs(ours - ref) <= bound).all(), f"{qtype.name}: {np.abs(ours - ref).max()}"


def check_get_rows(kern: Kernels, qtype: T) -> None:
    """Bit-exact rows, from 20 rows as in the file and 24 (interleaved Q4_0/Q8_0 where repacked)."""
    for rows in (20, 24):
        raw, wd = weights(qtype, rows, 512)
        m = kern.upload_matrix(raw, qtype, (rows, 512))
        tokens = np.array([3, 0, rows - 1, 3, 12], np.int32)
        out = kern.empty(4 * len(tokens) * 512)
        kern.get_rows(m, kern.upload(tokens), out, len(tokens))
        assert np.array_equal(kern.read(out, (len(tokens), 512)), wd[tokens]), rows


def check_rms_norm(kern: Kernels) -> None:
    x = RNG.standard_normal((5, 300)).astype(np.float32) * 3
    w = RNG.standard_normal(300).astype(np.float32)
    out = kern.empty(x.nbytes)
    kern.rms_norm(kern.upload(x), kern.upload(w), out, 300, 5, 1e-5)
    np.testing.assert_allclose(kern.read(out, x.shape), rms_norm(x, w, 1e-5), rtol=1e-5,
                               atol=1e-6)


def q8_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy's Q8_0 rounding of x's rows (weight_stream.q8_activations) as (int8 q, d)."""
    blocks = x.reshape(x.shape[0], -1, 32)
    d = np.max(np.abs(blocks), axis=-1) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.rint(blocks * inv[..., None]).astype(np.int8).reshape(x.shape)
    assert np.array_equal(q * np.repeat(d, 32, axis=1), q8_activations(x))
    return q, d


def check_q8_activations(kern: Kernels) -> None:
    """quantize_q8 and rms_norm_q8 round to exactly numpy's int8 values and scales (an all-zero
    block, values at the half-way points of the rounding, and a wide spread)."""
    x = (RNG.standard_normal((3, 256)) * np.logspace(-3, 3, 256)).astype(np.float32)
    x[1, 32:64] = 0.0
    x[2, :32] = np.arange(32) - 15.5  # d = 16.5/127: some x/d land near .5
    xq, xd = kern.quantize_q8(kern.upload(x), 256, 3)
    q, d = q8_reference(x)
    assert np.array_equal(kern.read(xq, x.shape, np.int8), q)
    assert np.array_equal(kern.read(xd, d.shape), d)
    sums = q.reshape(-1, 32).astype(np.int32).sum(1)  # after the scales, for interleaved Q4_0
    assert np.array_equal(kern.read(xd, sums.shape, np.int32, offset=4 * d.size), sums)
    w = RNG.standard_normal(256).astype(np.float32)
    out = kern.empty(x.nbytes)
    xq, xd = kern.rms_norm(kern.upload(x), kern.upload(w), out, 256, 3, 1e-5, q8=True)
    normed = kern.read(out, x.shape)
    np.testing.assert_allclose(normed, rms_norm(x, w, 1e-5), rtol=1e-5, atol=1e-6)
    q, d = q8_reference(normed)  # exactly what quantize_q8 makes of the normed rows
    assert np.array_equal(kern.read(xq, x.shape, np.int8), q)
    assert np.array_equal(kern.read(xd, d.shape), d)
    sums = q.reshape(-1, 32).astype(np.int32).sum(1)
    assert np.array_equal(kern.read(xd, sums.shape, np.int32, offset=4 * d.size), sums)


def check_rope(kern: Kernels, style: str) -> None:
    n_tok, heads, d, r, pos0 = 3, 4, 32, 24, 5  # partial rotary: only the first r dims turn
    inv = 1.0 / 10000.0 ** (np.arange(0, r, 2) / r)
    angles = np.arange(16, dtype=np.float64)[:, None] * inv[None, :]
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    x = RNG.standard_normal((n_tok, heads, d)).astype(np.float32)
    ref = x.copy()
    ref[..., :r] = apply_rope(x[..., :r], cos[pos0:pos0 + n_tok], sin[pos0:pos0 + n_tok], style)
    pad = np.zeros(7, np.float32)  # rotate at an offset, as in the KV cache
    buf = kern.upload(np.concatenate([pad, x.reshape(-1)]))
    kern.rope(buf, 7, kern.upload(cos), kern.upload(sin), pos0, n_tok, heads, d, r,
              style == "neox")
    ours = kern.read(buf, (7 + x.size,))[7:].reshape(x.shape)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def attention_reference(q, k, v, pos0):
    """numpy_backend's attention on cache contents: q (T, H, D), k/v (S, KV, D)."""
    n_tok, heads, d = q.shape
    kv = k.shape[1]
    g = heads // kv
    s = pos0 + n_tok
    qg = q.reshape(n_tok, kv, g, d).transpose(1, 2, 0, 3)
    scores = qg @ k[:s].transpose(1, 2, 0)[:, None] / math.sqrt(d)
    causal = np.arange(s)[None, :] > (pos0 + np.arange(n_tok))[:, None]
    out = softmax(np.where(causal, -np.inf, scores)) @ v[:s].transpose(1, 0, 2)[:, None]
    return out.transpose(2, 0, 1, 3).reshape(n_tok, heads * d)


def check_attention(kern: Kernels, n_tok: int, pos0: int, heads: int = 8, kv: int = 2,
                    d: int = 32, split: bool | None = None) -> None:
    n_ctx = pos0 + n_tok
    q = RNG.standard_normal((n_tok, heads, d)).astype(np.float32)
    k = RNG.standard_normal((n_ctx, kv, d)).astype(np.float32)
    v = RNG.standard_normal((n_ctx, kv, d)).astype(np.float32)
    out = kern.empty(4 * n_tok * heads * d)
    part = kern.empty(4 * n_tok * heads * kern.attention_splits(n_ctx) * (d + 2))
    q8 = kern.attention(kern.upload(q), kern.upload(k), kern.upload(v), out, part, n_tok, heads,
                        kv, d, pos0, split=split, q8=True)
    np.testing.assert_allclose(kern.read(out, (n_tok, heads * d)),
                               attention_reference(q, k, v, pos0), rtol=1e-5, atol=1e-5)
    if q8 is not None:  # rounded in the same launch: exactly what quantize_q8 makes of out
        n = n_tok * heads * d
        fused = kern.read(q8[0], (n,), np.int8), kern.read(q8[1], (n // 16,), np.int32)
        again = kern.quantize_q8(out, heads * d, n_tok)
        assert np.array_equal(fused[0], kern.read(again[0], (n,), np.int8))
        assert np.array_equal(fused[1], kern.read(again[1], (n // 16,), np.int32))


def check_swiglu_and_bias(kern: Kernels) -> None:
    g = RNG.standard_normal(1000).astype(np.float32) * 4
    u = RNG.standard_normal(1000).astype(np.float32)
    gb = kern.upload(g)
    kern.swiglu(gb, kern.upload(u), 1000)
    np.testing.assert_allclose(kern.read(gb, (1000,)), silu(g) * u, rtol=1e-5, atol=1e-7)
    bias = RNG.standard_normal(10).astype(np.float32)
    x = RNG.standard_normal(35).astype(np.float32)
    xb = kern.upload(x)
    kern.add_bias(xb, 5, kern.upload(bias), 10, 3)
    ref = x.copy()
    ref[5:35] += np.tile(bias, 3)
    np.testing.assert_array_equal(kern.read(xb, (35,)), ref)


def check_sampling(kern: Kernels) -> None:
    x = RNG.standard_normal((3, 5000)).astype(np.float32) * 5
    x[1, 17] = x[1, 4000] = x[1].max() + 1  # a tie: the first index wins, as numpy
    xb = kern.upload(x)
    ids = kern.empty(12)
    kern.argmax(xb, ids, 5000, 3)
    np.testing.assert_array_equal(kern.read(ids, (3,), np.int32), x.argmax(axis=1))
    vals, idx = kern.top_k(xb, 5000, 40)
    order = np.argsort(-x[0], kind="stable")[:40]
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_array_equal(vals, x[0][order])
    kern.softmax(xb, 5000, 3)
    np.testing.assert_allclose(kern.read(xb, x.shape), softmax(x), rtol=1e-5, atol=1e-9)


def check_fused_decode(kern: Kernels, qtype: T) -> None:
    """Decode's fused launches: Q/K/V into q and the caches at an offset, gate/up/SwiGLU;
    the matmul tolerance applies to every product, SwiGLU's to what it makes of them. Odd row
    counts too: the int8 kernels take rows in pairs (odd Q/K/V counts launch unfused)."""
    cols = 256
    for nq, nk in ((40, 8), (41, 9)):
        off = 3 * nk
        (rq, wq), (rk, wk), (rv, wv) = (weights(qtype, r, cols) for r in (nq, nk, nk))
        x = RNG.standard_normal(cols).astype(np.float32)
        q, kc, vc = kern.empty(4 * nq), kern.upload(np.zeros(64, np.float32)), kern.upload(
            np.zeros(64, np.float32))
        up = (kern.upload_matrix(r, qtype, (n, cols)) for r, n in ((rq, nq), (rk, nk), (rv, nk)))
        kern.matmul_qkv(*up, kern.upload(x), q, kc, vc, off)
        x = weight_input(x[None], qtype)[0]
        for buf, w, at in ((q, wq, 0), (kc, wk, off), (vc, wv, off)):
            got = kern.read(buf, (at + len(w),))[at:]
            bound = 1e-5 * (np.abs(w) @ np.abs(x)) + 1e-6
            assert (np.abs(got - w @ x) <= bound).all(), f"{qtype.name} qkv {nq}/{nk}"
    for rows in (70, 71, 72):  # 72: interleaved Q4_0/Q8_0 where the device repacks them
        (rg, wg), (ru, wu) = weights(qtype, rows, cols), weights(qtype, rows, cols)
        xs = RNG.standard_normal(cols).astype(np.float32)
        x = weight_input(xs[None], qtype)[0]
        gate, scratch = kern.empty(4 * rows), kern.empty(4 * rows)
        kern.matmul_glu(kern.upload_matrix(rg, qtype, (rows, cols)),
                        kern.upload_matrix(ru, qtype, (rows, cols)), kern.upload(xs), gate,
                        scratch)
        g, u = wg @ x, wu @ x  # each product's bound carried through silu (slope < 1.1) times u
        bound = 1e-5 * (1.1 * (np.abs(wg) @ np.abs(x)) * np.abs(u) + (np.abs(wu) @ np.abs(x))
                        * np.abs(silu(g))) + 1e-5
        got = kern.read(gate, (rows,))
        assert (np.abs(got - silu(g) * u) <= bound).all(), f"{qtype.name} glu {rows}"


def check_split_weights(kern: Kernels, qtype: T = T.Q4_0, n_toks: tuple[int, ...] = (1, 3)
                        ) -> None:
    """A weight bigger than the device's largest buffer is split by rows and still agrees."""
    raw, wd = weights(qtype, 50, 256)
    m = kern.upload_matrix(raw, qtype, (50, 256))
    assert len(m.parts) > 1, "expected CLAW_OPENCL_MAX_ALLOC to force a split"
    x = RNG.standard_normal((max(n_toks), 256)).astype(np.float32)
    for n_tok in n_toks:
        y = kern.empty(4 * n_tok * 50)
        kern.matmul(m, kern.upload(x[:n_tok]), y, n_tok)
        ref = weight_input(x[:n_tok], qtype) @ wd.T
        np.testing.assert_allclose(kern.read(y, (n_tok, 50)), ref, rtol=1e-4,
                                   atol=1e-4)


def random_gguf(path, qtype: T, *, dim: int, n_layers: int, ffn_dim: int, n_heads: int,
                n_kv_heads: int, vocab_size: int, seed: int = 7):
    """A Llama-shaped GGUF of random weights in `qtype` (norms F32), written without torch or
    transformers (the GPU machine has neither transformers nor a package index). Each distinct
    shape is quantized once and its bytes reused by every layer: for speed runs only. The
    weights depend on `seed` alone, not on what other tests drew before."""
    import gguf

    from runtime.config import ModelConfig
    from runtime.convert import _write_metadata
    from runtime.model_file import expected_shapes

    cfg = ModelConfig(arch="llama", vocab_size=vocab_size, dim=dim, n_layers=n_layers,
                      n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=dim // n_heads,
                      ffn_dim=ffn_dim, norm_eps=1e-5, rope_theta=10000.0,
                      rope_dim=dim // n_heads, rope_style="normal", context_length=4096)
    writer = gguf.GGUFWriter(path, "llama")
    _write_metadata(writer, cfg, qtype, None)
    blobs: dict[tuple[int, ...], np.ndarray] = {}
    rng = np.random.default_rng(seed)
    for name, shape in expected_shapes(cfg).items():
        if len(shape) == 1:
            writer.add_tensor(name, np.ones(shape, np.float32))
            continue
        if shape not in blobs:
            w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
            blobs[shape] = w.astype(np.float16) if qtype == T.F16 else quantize(w, qtype)
        blob = blobs[shape]
        writer.add_tensor(name, blob, raw_dtype=None if qtype == T.F16 else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def decode_speed(backend, n_gen: int = 32) -> tuple[float, float]:
    """(tokens/s of greedy decode on the device, weight GB/s that implies)."""
    import time

    cache = backend.new_cache(n_gen + 2)
    backend.forward_device([1], cache)
    token = backend.greedy_next()
    start = time.perf_counter()
    for _ in range(n_gen):
        backend.forward_device([token], cache)
        token = backend.greedy_next()
    tps = n_gen / (time.perf_counter() - start)
    streamed = sum(ref.nbytes for name, ref in backend.source.tensors.items()
                   if name != "token_embd.weight")
    return tps, streamed * tps / 1e9
