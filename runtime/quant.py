"""GGML block quantization: the tensor formats of GGUF files, in numpy.

A quantized row is a run of fixed-size *blocks*; each block stores `QK` weights in `nbytes` bytes.
Every layout below is a packed little-endian numpy structured dtype whose itemsize is exactly the
block's byte size, so raw file bytes are viewed as an array of blocks without copying, and the
field names follow llama.cpp's ggml-common.h. All work is vectorized over blocks; large tensors
are processed in chunks of blocks only to keep temporaries in cache.

Legacy formats (32 weights per block, one fp16 scale `d`, maybe an fp16 offset `m`):
    Q8_0  x = d * q                  q int8
    Q4_0  x = d * (q - 8)            q 4 bit
    Q4_1  x = d * q + m              q 4 bit
    Q5_0  x = d * (q - 16)           q 5 bit (4 low bits in nibbles, 5th bit in a 32-bit mask)
    Q5_1  x = d * q + m              q 5 bit
K formats (256-weight super-blocks of 8 x 32 or 16 x 16 sub-blocks, quantized sub-block scales):
    Q4_K  x = (d * sc_j) * q - (dmin * m_j)       6-bit sc/m per 32, q 4 bit
    Q5_K  x = (d * sc_j) * q - (dmin * m_j)       6-bit sc/m per 32, q 5 bit
    Q6_K  x = (d * sc_j) * (q - 32)               int8 sc per 16,    q 6 bit
Dequantization does the float32 arithmetic in llama.cpp's order, so it is bit-exact with
`gguf.quants.dequantize`. Q8_0, Q4_0 and the K formats search each block's scale (and min) for
the least squared error, the way llama.cpp's K-quant encoders do (a few candidate scales, each
refitted by least squares; see `_symmetric_scale`, `_affine_scale`); the other formats, and
`quantize(..., search=False)`, round to nearest against the max-based scale, for the legacy
formats byte for byte ggml's reference quantizers.

`quantize(..., importance=w)` makes the search minimize sum_j w_j (x_j - x'_j)^2 instead, with
one weight per input column (an importance matrix: the mean squared activation that meets that
column, see runtime/mixed_quant.py), since a matrix's output error is sum_j dW_j x_j and columns
fed larger inputs matter more. Rounding against a chosen scale stays to nearest, which is
optimal for any positive per-weight weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from math import prod

import numpy as np
from gguf import GGMLQuantizationType as T

QK = 32  # weights per block, legacy formats
QK_K = 256  # weights per super-block, K formats
_CHUNK = 1 << 12  # K-blocks per chunk: 1M weights, 4 MB of float32 (measured best, 2 cores)


class QuantError(ValueError):
    """Unsupported type, a byte count that does not match the shape, or a bad row length."""


# ---------------------------------------------------------------------------------------------
# helpers

_NIB = np.array([0, 4], dtype=np.uint8)


def _f32(h: np.ndarray) -> np.ndarray:
    """fp16 field (n,) -> float32 (n, 1), ready to broadcast over a block."""
    return h.astype(np.float32)[:, None]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., k) bytes -> (..., 2k): the k low nibbles, then the k high nibbles (ggml order)."""
    return (qs[..., None, :] >> _NIB[:, None] & 15).reshape(*qs.shape[:-1], 2 * qs.shape[-1])


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Inverse of `_nibbles`: (..., 2k) values < 16 -> (..., k) bytes."""
    k = q.shape[-1] // 2
    return q[..., :k] | (q[..., k:] << 4)


def _round_away(v: np.ndarray) -> np.ndarray:
    """C `roundf`: to nearest, halves away from zero (np.round goes to even)."""
    a = np.abs(v)
    f = np.floor(a)
    return np.copysign(f + (a - f >= 0.5), v)


def _inv(d: np.ndarray) -> np.ndarray:
    """1/d, and 0 where d == 0 (an all-zero block)."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _signed_absmax(x: np.ndarray) -> np.ndarray:
    """(..., k) -> (..., 1): the element of largest magnitude, sign kept (first one on ties)."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=-1, keepdims=True), axis=-1)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot product (n, k) x (n, k) -> (n,), without a temporary product array."""
    return np.einsum("ij,ij->i", a, b)


_Steps = tuple[np.ndarray, np.ndarray | None]  # per sub-block: step (n, s), offset or None


def _levels(x: np.ndarray, step: np.ndarray, offset: np.ndarray | None,
            bounds: tuple[int, int]) -> np.ndarray:
    """x (n, qk) rounded to nearest against each sub-block's stored step and offset
    (x ~ step * level + offset): int16 levels (n, qk) within `bounds`."""
    n, s = step.shape
    xs = x.reshape(n, s, -1)
    if offset is not None:
        xs = xs - offset[:, :, None]
    return np.rint(xs * _inv(step)[:, :, None]).clip(*bounds).astype(np.int16).reshape(n, -1)


def _symmetric_scale(x: np.ndarray, nmax: int, steps: int = 9,
                     w: np.ndarray | None = None) -> np.ndarray:
    """Step s per row of x (n, k) for levels -nmax..nmax-1 that minimizes sum w (x - s l)^2
    (w: per-weight importance like x, or None for all ones).

    Candidates: the row's signed absmax mapped onto -(nmax + i/10), |i| <= steps (0 is round to
    nearest); each rounds the row to levels l and refits the step by weighted least squares,
    s = sum(w x l) / sum(w l^2), whose error sum(w x^2) - sum(w x l)^2 / sum(w l^2) ranks them. The
    caller
    quantizes s to its storage format and rounds the weights against the stored step.
    Unweighted on purpose: weighting by x^2 (llama.cpp's Q6_K choice) gave the trained model a
    higher KL to F16 (Q6_K 1.36e-4 against 1.21e-4, Q4_0 2.96e-3 against 2.75e-3).
    """
    inv_max = _inv(_signed_absmax(x))
    wx = x if w is None else w * x
    best, scale = np.full(len(x), -1.0, np.float32), np.zeros(len(x), np.float32)
    for i in range(-steps, steps + 1):
        lv = np.rint(x * (-(nmax + np.float32(i / 10)) * inv_max)).clip(-nmax, nmax - 1)
        sxl, sll = _dot(wx, lv), _dot(lv if w is None else w * lv, lv)
        fit = sxl * _inv(sll)
        better = sxl * fit > best
        best, scale = np.where(better, sxl * fit, best), np.where(better, fit, scale)
    return scale


def _affine_scale(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                  w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Step s >= 0 and offset o >= 0 per row of x (n, k) for x ~ s l - o, l in 0..nmax, that
    minimize sum w (s l - o - x)^2 (Q4_K/Q5_K sub-blocks; the offset may not go below min(x, 0);
    w per weight like x, or None for all ones; the sums below are then weighted sums).

    Start from round to nearest between min(x, 0) and max(x); then try the steps
    (max - min) / (nmax + rmin + rdelta i), i = 0..nstep: each rounds the row and refits s and o
    together by least squares (o = 0 when the fit wants a positive minimum), and the one of least
    error wins; errors come from five sums, with no second pass over the row. Unweighted: the
    weights rms + |x| of llama.cpp's search gave the trained model a higher KL to F16 (Q4_K
    2.27e-3 against 2.02e-3).
    """
    w = np.ones_like(x) if w is None else w
    wx = w * x
    n = w.sum(axis=1, dtype=np.float64)
    lo, hi = np.minimum(x.min(axis=1), 0), x.max(axis=1)
    inv_range = _inv(hi - lo)[:, None]
    sx, sxx = wx.sum(axis=1, dtype=np.float64), _dot(wx, x).astype(np.float64)

    def fit(top: float) -> tuple[np.ndarray, ...]:  # levels at this step -> their sums
        lv = np.rint((x - lo[:, None]) * (np.float32(top) * inv_range)).clip(0, nmax)
        wl = w * lv
        return tuple(a.astype(np.float64) for a in (wl.sum(axis=1), _dot(wl, lv), _dot(wx, lv)))

    def error(s, m, sl, sll, sxl):  # sum (s l + m - x)^2 with m = -o, from the sums
        return sxx - 2 * s * sxl - 2 * m * sx + s * s * sll + 2 * s * m * sl + m * m * n

    scale, mn = (hi - lo).astype(np.float64) / nmax, lo.astype(np.float64)
    best = error(scale, mn, *fit(nmax))
    for i in range(nstep + 1):
        sl, sll, sxl = fit(nmax + rmin + rdelta * i)
        det = n * sll - sl * sl
        with np.errstate(divide="ignore", invalid="ignore"):
            s, m = (n * sxl - sx * sl) / det, (sll * sx - sl * sxl) / det
            s, m = np.where(m > 0, sxl / sll, s), np.minimum(m, 0)
        err = error(s, m, sl, sll, sxl)
        better = (det > 0) & (err < best)
        best = np.where(better, err, best)
        scale, mn = np.where(better, s, scale), np.where(better, m, mn)
    return np.maximum(scale, 0).astype(np.float32), (-mn).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# float formats: "blocks" of one element


def _dq_f32(b: np.ndarray, out: np.ndarray) -> None:
    out[:, 0] = b


def _q_f32(x: np.ndarray, out: np.ndarray) -> None:
    out[:] = x[:, 0]


def _dq_f16(b: np.ndarray, out: np.ndarray) -> None:
    out[:, 0] = b


def _q_f16(x: np.ndarray, out: np.ndarray) -> None:
    out[:] = x[:, 0]  # float32 -> float16 rounds to nearest even, as ggml does


def _dq_bf16(b: np.ndarray, out: np.ndarray) -> None:
    """BF16 (2 bytes): the high half of a float32."""
    out[:, 0] = (b.astype(np.uint32) << 16).view(np.float32)


def _q_bf16(x: np.ndarray, out: np.ndarray) -> None:
    """Round to nearest even on the dropped 16 bits; NaN stays a (quiet) NaN."""
    u = x[:, 0].view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    out[:] = np.where(nan, (u >> 16) | 64, (u + (0x7FFF + ((u >> 16) & 1))) >> 16)


# ---------------------------------------------------------------------------------------------
# legacy formats: 32 weights per block

Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", 32)])


def _dq_q8_0(b: np.ndarray, out: np.ndarray) -> None:
    """Q8_0 (34 bytes): d f16 | qs[32] int8.  x[j] = d * qs[j]."""
    np.multiply(b["qs"], _f32(b["d"]), out=out)  # (n, 32)


def _rtn_q8_0(x: np.ndarray, out: np.ndarray) -> None:
    d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)  # (n, 1)
    out["d"] = d[:, 0]
    out["qs"] = _round_away(x * _inv(d))


def _fit_q8_0(x: np.ndarray, out: np.ndarray, w: np.ndarray | None = None) -> _Steps:
    out["d"] = d = _symmetric_scale(x, 128, w=w).astype(np.float16)
    return _f32(d), None


def _pack_q8_0(q: np.ndarray, out: np.ndarray) -> None:
    out["qs"] = q


Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", 16)])


def _dq_q4_0(b: np.ndarray, out: np.ndarray) -> None:
    """Q4_0 (18 bytes): d f16 | qs[16] nibbles.

    x[j] = d * ((qs[j] & 15) - 8),  x[j + 16] = d * ((qs[j] >> 4) - 8),  j < 16.
    """
    np.multiply(_f32(b["d"]), _nibbles(b["qs"]).view(np.int8) - np.int8(8), out=out)


def _rtn_q4_0(x: np.ndarray, out: np.ndarray) -> None:
    d = _signed_absmax(x) / np.float32(-8)  # the largest magnitude maps to q = 0 exactly
    q = np.trunc(x * _inv(d) + np.float32(8.5)).clip(0, 15).astype(np.uint8)
    out["d"] = d[:, 0]
    out["qs"] = _pack_nibbles(q)


def _fit_q4_0(x: np.ndarray, out: np.ndarray, w: np.ndarray | None = None) -> _Steps:
    out["d"] = d = _symmetric_scale(x, 8, w=w).astype(np.float16)
    return _f32(d), None


def _pack_q4_0(q: np.ndarray, out: np.ndarray) -> None:
    out["qs"] = _pack_nibbles((q + 8).astype(np.uint8))


Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])


def _dq_q4_1(b: np.ndarray, out: np.ndarray) -> None:
    """Q4_1 (20 bytes): d f16 | m f16 | qs[16] nibbles (order as Q4_0).  x = d * q + m."""
    np.multiply(_f32(b["d"]), _nibbles(b["qs"]), out=out)
    out += _f32(b["m"])


def _affine(x: np.ndarray, top: int, out: np.ndarray) -> np.ndarray:
    """Q4_1/Q5_1 rounding: levels 0..top between each block's min and max; stores d and m."""
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    d = (hi - lo) / np.float32(top)
    out["d"], out["m"] = d[:, 0], lo[:, 0]
    return np.trunc((x - lo) * _inv(d) + np.float32(0.5)).clip(0, top).astype(np.uint8)


def _q_q4_1(x: np.ndarray, out: np.ndarray) -> None:
    out["qs"] = _pack_nibbles(_affine(x, 15, out))


Q5_0 = np.dtype([("d", "<f2"), ("qh", "u1", 4), ("qs", "u1", 16)])


def _q5_bits(b: np.ndarray) -> np.ndarray:
    """Low nibbles | 5th bits -> q (n, 32) uint8; bit j of the little-endian qh is for x[j]."""
    return _nibbles(b["qs"]) | np.unpackbits(b["qh"], axis=1, bitorder="little") << 4


def _pack_q5(q: np.ndarray, out: np.ndarray) -> None:
    out["qs"] = _pack_nibbles(q & 15)
    out["qh"] = np.packbits(q >> 4, axis=1, bitorder="little")


def _dq_q5_0(b: np.ndarray, out: np.ndarray) -> None:
    """Q5_0 (22 bytes): d f16 | qh[4] | qs[16] nibbles.  x[j] = d * (q[j] - 16),
    q[j] = nibble j (order as Q4_0) | bit j of qh (as a little-endian u32) << 4."""
    np.multiply(_f32(b["d"]), _q5_bits(b).view(np.int8) - np.int8(16), out=out)


def _q_q5_0(x: np.ndarray, out: np.ndarray) -> None:
    d = _signed_absmax(x) / np.float32(-16)
    q = np.trunc(x * _inv(d) + np.float32(16.5)).clip(0, 31).astype(np.uint8)
    out["d"] = d[:, 0]
    _pack_q5(q, out)


Q5_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "u1", 4), ("qs", "u1", 16)])


def _dq_q5_1(b: np.ndarray, out: np.ndarray) -> None:
    """Q5_1 (24 bytes): d f16 | m f16 | qh[4] | qs[16]; q as Q5_0.  x = d * q + m."""
    np.multiply(_f32(b["d"]), _q5_bits(b), out=out)
    out += _f32(b["m"])


def _q_q5_1(x: np.ndarray, out: np.ndarray) -> None:
    _pack_q5(_affine(x, 31, out), out)


# ---------------------------------------------------------------------------------------------
# K formats: 256 weights per super-block

Q4_K = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)])
Q5_K = np.dtype(
    [("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qh", "u1", 32), ("qs", "u1", 128)]
)


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes -> eight 6-bit scales and eight 6-bit mins, (n, 8) each.

    bytes 0-3:  sc[0:4] in bits 0-5, bits 4-5 of sc[4:8] in bits 6-7
    bytes 4-7:  m[0:4]  in bits 0-5, bits 4-5 of m[4:8]  in bits 6-7
    bytes 8-11: low 4 bits of sc[4:8] in bits 0-3, low 4 bits of m[4:8] in bits 4-7
    """
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([a & 63, (c & 15) | (a >> 6 << 4)], axis=1)
    m = np.concatenate([b & 63, (c >> 4) | (b >> 6 << 4)], axis=1)
    return sc, m


def _pack_scale_min_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Inverse of `_scale_min_k4`: (n, 8) values < 64 each -> (n, 12) bytes."""
    a = sc[:, :4] | (sc[:, 4:] >> 4 << 6)
    b = m[:, :4] | (m[:, 4:] >> 4 << 6)
    c = (sc[:, 4:] & 15) | (m[:, 4:] << 4)
    return np.concatenate([a, b, c], axis=1)


def _dq_k4(b: np.ndarray, q: np.ndarray, out: np.ndarray) -> None:
    """x = (d * sc) * q - (dmin * m) for q (n, 8, 32) into out (n, 256)."""
    sc, m = _scale_min_k4(b["scales"])
    d, dm = _f32(b["d"]) * sc, _f32(b["dmin"]) * m  # (n, 8)
    out = out.reshape(-1, 8, 32)
    np.multiply(d[:, :, None], q, out=out)
    out -= dm[:, :, None]


def _dq_q4_k(b: np.ndarray, out: np.ndarray) -> None:
    """Q4_K (144 bytes): d f16 | dmin f16 | scales[12] (6-bit sc, m x 8) | qs[128] nibbles.

    Sub-block j (32 weights) holds the low nibbles (j even) or high nibbles (j odd) of
    qs[32 * (j // 2) : 32 * (j // 2) + 32].  x = (d * sc[j]) * q - (dmin * m[j]).
    """
    _dq_k4(b, _nibbles(b["qs"].reshape(-1, 4, 32)).reshape(-1, 8, 32), out)


def _dq_q5_k(b: np.ndarray, out: np.ndarray) -> None:
    """Q5_K (176 bytes): d f16 | dmin f16 | scales[12] | qh[32] | qs[128] nibbles.

    Low 4 bits as Q4_K; the 5th bit of weight l of sub-block j is bit j of qh[l].
    """
    lo = _nibbles(b["qs"].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    hi = np.unpackbits(b["qh"][:, None, :], axis=1, bitorder="little")  # (n, 8, 32)
    _dq_k4(b, lo | hi << 4, out)


def _rtn_k4(x: np.ndarray, out: np.ndarray, nmax: int) -> np.ndarray:
    """Asymmetric RTN for Q4_K/Q5_K: x (n, 256) -> levels (n, 256) in [0, nmax]; fills
    d/dmin/scales. Per sub-block: offset mn = -min(x, 0) >= 0 and step s = (max - min) / nmax,
    stored as `_pack_k4_scales` does; the weights round against the stored step and offset."""
    x8 = x.reshape(-1, 8, 32)
    mn = -np.minimum(x8.min(axis=2), 0)  # (n, 8)
    s = (x8.max(axis=2) + mn) / np.float32(nmax)
    d, dmin, sc, m = _pack_k4_scales(s, mn, out)
    return _levels(x, d * sc, -(dmin * m), (0, nmax))


def _pack_k4_scales(s: np.ndarray, mn: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, ...]:
    """Sub-block steps and offsets (n, 8) -> 6-bit sc and m against the super-block's fp16 d and
    dmin (the largest maps to 63); fills d/dmin/scales, returns (d, dmin, sc, m) as float32."""
    d = (s.max(axis=1) / np.float32(63)).astype(np.float16)  # (n,)
    dmin = (mn.max(axis=1) / np.float32(63)).astype(np.float16)
    sc = np.rint(s * _inv(_f32(d))).clip(0, 63).astype(np.uint8)  # (n, 8)
    m = np.rint(mn * _inv(_f32(dmin))).clip(0, 63).astype(np.uint8)
    out["d"], out["dmin"], out["scales"] = d, dmin, _pack_scale_min_k4(sc, m)
    return _f32(d), _f32(dmin), sc.astype(np.float32), m.astype(np.float32)


def _fit_k4(x: np.ndarray, out: np.ndarray, nmax: int, rmin: float, nstep: int,
            w: np.ndarray | None = None) -> _Steps:
    """Searched Q4_K/Q5_K scales: each 32-weight sub-block gets the step and offset of
    `_affine_scale`; the eight of each are stored as 6-bit multiples of the super-block's fp16
    d and dmin (fills d/dmin/scales)."""
    s, mn = _affine_scale(x.reshape(-1, 32), nmax, rmin, 0.1, nstep,
                          None if w is None else w.reshape(-1, 32))
    d, dmin, sc, m = _pack_k4_scales(s.reshape(-1, 8), mn.reshape(-1, 8), out)
    return d * sc, -(dmin * m)  # x = (d sc) q - (dmin m), as the dequantizer computes it


def _pack_q4_k(q: np.ndarray, out: np.ndarray) -> None:
    out["qs"] = _pack_nibbles(q.astype(np.uint8).reshape(-1, 4, 64)).reshape(-1, 128)


def _pack_q5_k(q: np.ndarray, out: np.ndarray) -> None:
    q = q.astype(np.uint8).reshape(-1, 8, 32)
    out["qs"] = _pack_nibbles((q & 15).reshape(-1, 4, 64)).reshape(-1, 128)
    out["qh"] = np.packbits(q >> 4, axis=1, bitorder="little")[:, 0, :]


def _rtn_q4_k(x: np.ndarray, out: np.ndarray) -> None:
    _pack_q4_k(_rtn_k4(x, out, 15), out)


def _rtn_q5_k(x: np.ndarray, out: np.ndarray) -> None:
    _pack_q5_k(_rtn_k4(x, out, 31), out)


def _fit_q4_k(x: np.ndarray, out: np.ndarray, w: np.ndarray | None = None) -> _Steps:
    return _fit_k4(x, out, 15, -1.0, 20, w)


def _fit_q5_k(x: np.ndarray, out: np.ndarray, w: np.ndarray | None = None) -> _Steps:
    return _fit_k4(x, out, 31, -0.5, 15, w)


Q6_K = np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")])
_SH6 = np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]


def _dq_q6_k(b: np.ndarray, out: np.ndarray) -> None:
    """Q6_K (210 bytes): ql[128] | qh[64] | scales[16] int8 | d f16.

    Two halves of 128 weights, each from ql[64 h : 64 h + 64] and qh[32 h : 32 h + 32]; for l < 32
    weights l, l + 32, l + 64, l + 96 of the half take ql[l] & 15, ql[l + 32] & 15, ql[l] >> 4,
    ql[l + 32] >> 4 as low bits and bits (0,1), (2,3), (4,5), (6,7) of qh[l] as high bits.
    x = (d * scales[i // 16]) * (q - 32).
    """
    lo = _nibbles(b["ql"].reshape(-1, 2, 64)).reshape(-1, 2, 4, 32)  # [half, quarter, l]
    hi = b["qh"].reshape(-1, 2, 1, 32) >> _SH6 & 3  # (n, 2, 4, 32)
    q = ((lo | hi << 4).view(np.int8) - np.int8(32)).reshape(-1, 16, 16)
    d = _f32(b["d"]) * b["scales"]  # (n, 16)
    np.multiply(d[:, :, None], q, out=out.reshape(-1, 16, 16))


def _pack_q6_k(q: np.ndarray, out: np.ndarray) -> None:
    """q (n, 256) in -32..31 -> the Q6_K blocks' ql and qh."""
    q = (q + 32).astype(np.uint8).reshape(-1, 2, 4, 32)  # [half, quarter, l]
    out["ql"] = (q[:, :, 0:2] & 15 | q[:, :, 2:4] << 4).reshape(-1, 128)
    hi = q >> 4 << _SH6
    out["qh"] = (hi[:, :, 0] | hi[:, :, 1] | hi[:, :, 2] | hi[:, :, 3]).reshape(-1, 64)


def _rtn_q6_k(x: np.ndarray, out: np.ndarray) -> None:
    """Symmetric RTN: per 16 weights the step s = (signed absmax) / -32, so the largest magnitude
    maps to q - 32 = -32 exactly; the sixteen s are int8 against the fp16 d = max |s| / 127."""
    x = x.reshape(-1, 16, 16)
    s = _signed_absmax(x)[:, :, 0] / np.float32(-32)  # (n, 16)
    d = (np.abs(s).max(axis=1) / np.float32(127)).astype(np.float16)  # (n,)
    sc = np.rint(s * _inv(_f32(d))).clip(-128, 127).astype(np.int8)
    out["scales"], out["d"] = sc, d
    _pack_q6_k(_levels(x, _f32(d) * sc, None, (-32, 31)), out)


def _fit_q6_k(x: np.ndarray, out: np.ndarray, w: np.ndarray | None = None) -> _Steps:
    """Searched Q6_K scales: each 16-weight sub-block's step from `_symmetric_scale`; the
    sixteen steps are int8 multiples of the fp16 d that maps the largest onto -128."""
    s = _symmetric_scale(x.reshape(-1, 16), 32, w=None if w is None else w.reshape(-1, 16))
    s = s.reshape(-1, 16)
    d = (_signed_absmax(s)[:, 0] / np.float32(-128)).astype(np.float16)  # (n,)
    sc = np.rint(s * _inv(_f32(d))).clip(-128, 127).astype(np.int8)
    out["scales"], out["d"] = sc, d
    return _f32(d) * sc, None  # (n, 16)


# ---------------------------------------------------------------------------------------------
# registry and public API


@dataclass(frozen=True)
class _Format:
    qk: int  # weights per block
    dtype: np.dtype  # one block
    dequant: Callable[[np.ndarray, np.ndarray], None]  # blocks (n,) -> float32 out (n, qk)
    quant: Callable[[np.ndarray, np.ndarray], None] | None = None  # float32 (n, qk) -> blocks
    rtn: Callable[[np.ndarray, np.ndarray], None] | None = None  # round to nearest, no search
    # searched formats, instead of `quant`: `fit` fills the blocks' scales from float32 (n, qk)
    # (weighted per weight when given importance (n, qk)) and returns each sub-block's step
    # and offset; the weights are then rounded against those to levels within `bounds`, which
    # `pack` stores
    fit: Callable[..., _Steps] | None = None
    pack: Callable[[np.ndarray, np.ndarray], None] | None = None
    bounds: tuple[int, int] = (0, 0)

    def encode(self, x: np.ndarray, out: np.ndarray, w: np.ndarray | None = None) -> None:
        if self.fit is None:
            self.quant(x, out)
            return
        assert self.pack is not None
        self.pack(_levels(x, *self.fit(x, out, w), self.bounds), out)


_FORMATS: dict[T, _Format] = {
    T.F32: _Format(1, np.dtype("<f4"), _dq_f32, _q_f32),
    T.F16: _Format(1, np.dtype("<f2"), _dq_f16, _q_f16),
    T.BF16: _Format(1, np.dtype("<u2"), _dq_bf16, _q_bf16),
    T.Q8_0: _Format(QK, Q8_0, _dq_q8_0, None, _rtn_q8_0, _fit_q8_0, _pack_q8_0, (-128, 127)),
    T.Q4_0: _Format(QK, Q4_0, _dq_q4_0, None, _rtn_q4_0, _fit_q4_0, _pack_q4_0, (-8, 7)),
    T.Q4_1: _Format(QK, Q4_1, _dq_q4_1, _q_q4_1),
    T.Q5_0: _Format(QK, Q5_0, _dq_q5_0, _q_q5_0),
    T.Q5_1: _Format(QK, Q5_1, _dq_q5_1, _q_q5_1),
    T.Q4_K: _Format(QK_K, Q4_K, _dq_q4_k, None, _rtn_q4_k, _fit_q4_k, _pack_q4_k, (0, 15)),
    T.Q5_K: _Format(QK_K, Q5_K, _dq_q5_k, None, _rtn_q5_k, _fit_q5_k, _pack_q5_k, (0, 31)),
    T.Q6_K: _Format(QK_K, Q6_K, _dq_q6_k, None, _rtn_q6_k, _fit_q6_k, _pack_q6_k, (-32, 31)),
}
SUPPORTED: frozenset[T] = frozenset(_FORMATS)
SEARCHED: frozenset[T] = frozenset(q for q, f in _FORMATS.items() if f.fit is not None)


def _format(qtype: T | int) -> tuple[T, _Format]:
    try:
        qtype = T(qtype)
    except ValueError:
        raise QuantError(f"unknown GGML quantization type {qtype!r}") from None
    if qtype not in _FORMATS:
        raise QuantError(f"unsupported quantization type {qtype.name}")
    return qtype, _FORMATS[qtype]


def block_shape(qtype: T) -> tuple[int, int]:
    """(weights per block, bytes per block)."""
    _, f = _format(qtype)
    return f.qk, f.dtype.itemsize


def row_bytes(qtype: T, n_cols: int) -> int:
    """Bytes of one row of `n_cols` weights; QuantError unless n_cols is a multiple of the block."""
    qtype, f = _format(qtype)
    if n_cols < 0 or n_cols % f.qk:
        raise QuantError(f"{qtype.name}: row length {n_cols} is not a multiple of {f.qk}")
    return n_cols // f.qk * f.dtype.itemsize


def dequantize(raw: np.ndarray, qtype: T, shape: tuple[int, ...]) -> np.ndarray:
    """Bytes of a tensor (any dtype, file order) -> float32 array of `shape` (numpy order).

    `raw` may be any number of whole rows of a bigger tensor (e.g. a memmap slice). The byte
    count is checked against `shape` before anything is allocated. For F32 the result is a view
    of `raw` (read-only if `raw` is).
    """
    qtype, f = _format(qtype)
    if not isinstance(raw, np.ndarray):
        raw = np.frombuffer(raw, np.uint8)  # bytes, memoryview, mmap
    shape = tuple(int(n) for n in shape)
    if any(n < 0 for n in shape):
        raise QuantError(f"{qtype.name}: bad shape {shape}")
    n_cols = shape[-1] if shape else 1
    row_bytes(qtype, n_cols)
    want = prod(shape) // f.qk * f.dtype.itemsize
    if raw.nbytes != want:
        raise QuantError(
            f"{qtype.name} tensor of shape {shape} needs {want} bytes, got {raw.nbytes}"
        )
    raw = raw if raw.flags.c_contiguous else np.ascontiguousarray(raw)
    blocks = raw.reshape(-1).view(np.uint8).view(f.dtype)  # (n_blocks,), no copy
    if qtype == T.F32:
        return blocks.view(np.float32).reshape(shape)
    out = np.empty((len(blocks), f.qk), np.float32)
    step = _CHUNK * QK_K // f.qk
    for i in range(0, len(blocks), step):
        f.dequant(blocks[i : i + step], out[i : i + step])
    return out.reshape(shape)


def importance_weights(importance: np.ndarray, n_cols: int) -> np.ndarray:
    """Per-column importance (n_cols,) -> float32 weights with mean 1 and a floor of 1e-3, so a
    column no calibration token ever fed still counts a little and no block's weights are all
    zero (which would leave its scale undetermined)."""
    imp = np.asarray(importance, dtype=np.float64).reshape(-1)
    if imp.shape != (n_cols,) or not np.all(np.isfinite(imp)) or (imp < 0).any():
        raise QuantError(f"importance: expected {n_cols} finite non-negative values, one per "
                         f"column, got shape {imp.shape}")
    mean = imp.mean()
    imp = imp / mean if mean > 0 else np.ones_like(imp)
    return (imp + 1e-3).astype(np.float32)


@dataclass
class BlockScales:
    """One block a row with its scales fitted and its quants still to choose, for an encoder
    that picks the levels itself (runtime/gptq.py). Weight j of a block is stored as a level
    within `bounds` and dequantizes to step[:, s] * level + offset[:, s], s its sub-block."""

    blocks: np.ndarray  # (n,) of the format's block dtype, scales filled
    qk: int  # weights a block
    step: np.ndarray  # (n, sub-blocks) float32
    offset: np.ndarray | None  # like step, or None for the symmetric formats
    bounds: tuple[int, int]
    pack: Callable[[np.ndarray, np.ndarray], None]

    def round(self, x: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Weight j of each row's block, x (n,) -> (its nearest level, the value the
        dequantizer gives that level)."""
        s = j * self.step.shape[1] // self.qk
        step = self.step[:, s]
        off = np.float32(0) if self.offset is None else self.offset[:, s]
        level = np.rint((x.astype(np.float32) - off) * _inv(step)).clip(*self.bounds)
        return level.astype(np.int16), step * level.astype(np.float32) + off

    def set_levels(self, levels: np.ndarray) -> np.ndarray:
        """Stores levels (n, qk) in the blocks' quants; returns the blocks."""
        self.pack(levels, self.blocks)
        return self.blocks


def fit_scales(x: np.ndarray, qtype: T, importance: np.ndarray | None = None) -> BlockScales:
    """The searched fit of one block a row, x (n, qk) float32, weighted per weight by
    `importance` (n, qk) when given: scales stored, levels not yet (`BlockScales`)."""
    qtype, f = _format(qtype)
    if f.fit is None or f.pack is None:
        raise QuantError(f"{qtype.name} has no searched scales")
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, f.qk)
    blocks = np.zeros(len(x), f.dtype)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        step, offset = f.fit(x, blocks, importance)
    return BlockScales(blocks, f.qk, step, offset, f.bounds, f.pack)


def quantize(x: np.ndarray, qtype: T, *, search: bool = True,
             importance: np.ndarray | None = None) -> np.ndarray:
    """float32 (..., n_cols) -> uint8 (..., row_bytes(qtype, n_cols)), in llama.cpp's layout.

    Q8_0, Q4_0 and the K formats search each block's scale (and min) for the least squared
    error, weighted per column by `importance` (n_cols,) when given; `search=False` rounds to
    nearest against the max-based scale instead (faster; for Q8_0 and Q4_0 byte for byte ggml's
    reference quantizer; importance is then ignored, as it is by the other formats).
    """
    qtype, f = _format(qtype)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 0:
        raise QuantError(f"{qtype.name}: cannot quantize a scalar")
    nb = row_bytes(qtype, x.shape[-1])
    xb = x.reshape(-1, f.qk)  # (n_blocks, qk)
    out = np.zeros(len(xb), f.dtype)
    step = _CHUNK * QK_K // f.qk
    encode = f.encode if search or f.rtn is None else f.rtn
    wb = None  # the importance of each block's weights: row-major blocks cycle over the columns
    if importance is not None and search and f.fit is not None:
        wb = importance_weights(importance, x.shape[-1]).reshape(-1, f.qk)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for i in range(0, len(xb), step):
            if wb is None:
                encode(xb[i : i + step], out[i : i + step])
            else:
                n = len(xb[i : i + step])
                encode(xb[i : i + step], out[i : i + step], wb[np.arange(i, i + n) % len(wb)])
    return out.view(np.uint8).reshape(*x.shape[:-1], nb)
