"""Error-compensating rounding of a weight matrix into a GGML block type (the GPTQ algorithm,
Frantar et al. 2022, arXiv:2210.17323), written here for llama.cpp's block layouts.

Why: rounding each weight to its nearest level is best for the weights, not for what the
matrix computes. Given the second moments of the inputs the matrix meets on calibration text,
H = E[x x^T] (its Gram matrix), a change dW of one row changes that row's output by
dW H dW^T in mean square. Quantizing the columns in order, the error a column's rounding
leaves is cancelled as far as H allows by moving the columns not yet quantized (the optimal
brain surgeon's update, read off the Cholesky factor of H^-1), so later roundings absorb
earlier ones. The diagonal of H alone is the importance matrix (runtime/mixed_quant.py);
this uses its off-diagonal terms too, which is where the correlated inputs of a trained
model's matrices are.

Block formats: when the sweep reaches a block's first column, the block's scales are fitted
(`quant.fit_scales`, weighted by diag H as the importance-weighted encoders are) to the
weights as they stand then, earlier columns' updates included; the block's columns then round
against those stored scales one at a time. Updates to columns beyond the current batch of
columns wait for the batch's end and go in as one matrix product (the paper's lazy batches).
The bytes are the format's own layout: any GGUF reader dequantizes them.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from runtime.quant import SEARCHED, QuantError, block_shape, fit_scales, importance_weights

DAMP = 0.01  # of H's mean diagonal, added to its diagonal: H^-1 exists with dead columns
BATCH = 128  # columns a lazy batch takes at least (a whole number of blocks)


def inverse_factor(gram: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """The upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 = U^T U. Row i of U,
    divided by U[i, i], is how the error of column i spreads onto the columns after it. More
    damping is tried if rounding leaves the damped H short of positive definite."""
    h = np.array(gram, dtype=np.float64)
    mean = float(np.mean(np.diag(h)))
    base = h.copy()
    for factor in (1, 10, 100):
        h = base + np.eye(len(h)) * (damp * factor * mean + 1e-12)
        try:
            lower = np.linalg.cholesky(np.linalg.inv(h))
            return lower.T
        except np.linalg.LinAlgError:
            continue
    raise QuantError("gptq: the activations' Gram matrix is not positive definite even "
                     f"with {100 * damp:g}x its mean diagonal added")


def quantize(w: np.ndarray, qtype: T, gram: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """float32 (rows, cols) -> uint8 (rows, row_bytes) of `qtype` (a searched type: Q8_0,
    Q4_0, Q4_K, Q5_K, Q6_K), each row's error compensated under `gram` (cols, cols)."""
    if qtype not in SEARCHED:
        raise QuantError(f"gptq: {T(qtype).name} has no searched scales (expected one of "
                         f"{', '.join(sorted(q.name for q in SEARCHED))})")
    qk, _ = block_shape(qtype)
    rows, cols = w.shape
    if cols % qk or gram.shape != (cols, cols):
        raise QuantError(f"gptq: a {rows}x{cols} matrix needs rows of whole {qk}-weight "
                         f"blocks and a {cols}x{cols} Gram matrix, got {gram.shape}")
    u = inverse_factor(gram, damp)
    importance = importance_weights(np.diag(gram), cols)
    work = np.array(w, dtype=np.float64)
    levels = np.empty((rows, qk), np.int16)
    out = None
    batch = max(qk, BATCH // qk * qk)
    for start in range(0, cols, batch):
        end = min(start + batch, cols)
        part = work[:, start:end]  # a view: updated in place
        errors = np.empty_like(part)
        for i in range(end - start):
            col = start + i
            j = col % qk
            if j == 0:
                block = part[:, i:i + qk].astype(np.float32)
                scales = fit_scales(block, qtype, np.broadcast_to(
                    importance[col:col + qk], block.shape))
            level, value = scales.round(part[:, i], j)
            levels[:, j] = level
            errors[:, i] = (part[:, i] - value) / u[col, col]
            part[:, i + 1:] -= np.outer(errors[:, i], u[col, col + 1:end])
            if j == qk - 1:
                blocks = scales.set_levels(levels)
                if out is None:
                    out = np.empty((rows, cols // qk), blocks.dtype)
                out[:, col // qk] = blocks
        work[:, end:] -= errors @ u[start:end, end:]
    assert out is not None
    return out.view(np.uint8).reshape(rows, -1)
