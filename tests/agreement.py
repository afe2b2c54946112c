"""Token agreement between two correct forward passes whose logits differ by a small amount.

Where quantized products round their inputs to Q8_0 blocks (as llama.cpp does), two
implementations that add in a different order can put an input on either side of a rounding
midpoint, and logits move by up to a few 1e-3 (INT8_LOGIT_TOL below). The tiny
random-weight test models have near-ties at that distance, so "identical greedy tokens" becomes:
identical wherever the choice is not a tie at rounding distance, i.e. a differing argmax is only
allowed where the reference's top-two margin is within twice the two passes' largest logit gap.
"""

from __future__ import annotations

import numpy as np

# Whole-model logits where quantized products round their inputs to Q8_0 blocks: an input that
# two correct implementations compute a float rounding apart can land on either side of a
# rounding midpoint and move by one step (max|x|/127), so their logits differ by up to a few
# 1e-3 (measured 1.3e-4..2.1e-3 OpenCL vs numpy, 3.9e-3..4.6e-3 numpy vs float transformers on
# the tiny models, 1.2e-2 on random weights whose logits reach 1.6), not 1e-5; a wrong nibble or
# scale moves them by ~1e-1. Relative to the logits' scale (int8_logit_bound); greedy tokens
# may differ only at near-ties within that distance (below).
INT8_LOGIT_TOL = 1e-2


def int8_logit_bound(want: np.ndarray) -> float:
    return 2 * INT8_LOGIT_TOL * max(1.0, float(np.abs(want).max()))


def margin(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 per row."""
    top2 = np.sort(logits, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def assert_same_choices(got: np.ndarray, want: np.ndarray) -> int:
    """Rows of logits (…, vocab): argmax equal except at ties within rounding distance.
    Returns how many rows differ (all of them near-ties)."""
    got, want = got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])
    differ = got.argmax(-1) != want.argmax(-1)
    gap = np.abs(got - want).max(-1)
    assert (margin(want)[differ] <= 2 * gap[differ]).all(), \
        f"argmax differs at rows {np.flatnonzero(differ)} beyond rounding distance"
    return int(differ.sum())


def greedy_with_logits(backend, ids: list[int], n: int, chunk: int | None = None):
    """n greedy tokens after ids (prefill in `chunk`-token pieces), and the logits behind each."""
    cache = backend.new_cache(len(ids) + n)
    step = chunk or len(ids)
    for i in range(0, len(ids), step):
        logits = backend.forward(ids[i:i + step], cache)
    tokens, rows = [], []
    for _ in range(n):
        rows.append(logits[-1])
        tokens.append(int(np.argmax(logits[-1])))
        logits = backend.forward([tokens[-1]], cache)
    return tokens, np.array(rows)


def assert_same_greedy(ours, ref, ids: list[int], n: int, chunk: int | None = None) -> int:
    """Both backends' greedy continuations agree up to the first step that is a tie at
    rounding distance (after it the contexts differ). Returns the steps compared."""
    a, la = greedy_with_logits(ours, ids, n, chunk)
    b, lb = greedy_with_logits(ref, ids, n, chunk)
    for t in range(n):
        if a[t] != b[t]:
            assert margin(lb[t]) <= 2 * np.abs(la[t] - lb[t]).max(), \
                f"greedy token {t}: {a[t]} != {b[t]} beyond rounding distance"
            return t
    return n
