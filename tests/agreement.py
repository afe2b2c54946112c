"""Token agreement between two correct forward passes whose logits differ by a small amount.

Where Q4_0/Q8_0 products round their inputs to Q8_0 blocks (as llama.cpp does), two
implementations that add in a different order can put an input on either side of a rounding
midpoint, and logits move by up to a few 1e-3 (tests/opencl_checks.INT8_LOGIT_TOL). The tiny
random-weight test models have near-ties at that distance, so "identical greedy tokens" becomes:
identical wherever the choice is not a tie at rounding distance, i.e. a differing argmax is only
allowed where the reference's top-two margin is within twice the two passes' largest logit gap.
"""

from __future__ import annotations

import numpy as np


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
