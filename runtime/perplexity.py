"""Perplexity and KL divergence the way llama.cpp's `llama-perplexity` computes them, so our
figures can be put beside its own.

The text is tokenized once (with BOS when the vocabulary adds one) and cut into
non-overlapping windows of n_ctx tokens; each window is evaluated from an empty cache with its
first token replaced by BOS, and only the second half is scored (positions n_ctx/2 .. n_ctx-2
predict the next token), so every scored token sees at least n_ctx/2 tokens of context.
Perplexity is exp(mean negative log-likelihood) with llama.cpp's uncertainty (the standard
error of the mean NLL carried through exp). Given a base model, the KL divergence
KL(base || model) of the two next-token distributions is averaged over the same positions,
with the share of positions whose most likely token agrees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from runtime.errors import ModelError


@dataclass
class Perplexity:
    ppl: float
    ppl_error: float  # ± one standard error, as llama-perplexity prints it
    nll: float  # mean negative log-likelihood, nats per token
    tokens_scored: int
    windows: int
    n_ctx: int
    kl_mean: float | None = None  # KL(base || model), nats per token
    kl_max: float | None = None
    top1_agree: float | None = None  # share of positions with the same argmax as the base
    # each scored token's NLL, in order: two files' figures on the same text compared token by
    # token (`paired_log_ratio`) have a far smaller error than either perplexity alone
    token_nll: np.ndarray | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("token_nll")
        return out


def paired_log_ratio(a: Perplexity, b: Perplexity) -> tuple[float, float]:
    """ln(ppl_a / ppl_b) and its standard error, from the per-token NLL differences of two
    evaluations of the same tokens (llama-perplexity's "Mean ln(PPL(Q)/PPL(base))")."""
    if a.token_nll is None or b.token_nll is None or len(a.token_nll) != len(b.token_nll):
        raise ValueError("paired_log_ratio needs two evaluations of the same tokens")
    diff = a.token_nll - b.token_nll
    return float(diff.mean()), float(diff.std() / np.sqrt(max(len(diff) - 1, 1)))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Rows of logits -> log-probabilities, in float64 (the sums over a vocabulary)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(base_logp: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """KL(base || model) per row, from log-probabilities."""
    return (np.exp(base_logp) * (base_logp - logp)).sum(axis=-1)


def windows(ids: Sequence[int], n_ctx: int, bos: int | None) -> list[list[int]]:
    """Non-overlapping n_ctx-token windows; each starts with BOS when the model adds one."""
    if n_ctx < 4:
        raise ModelError(f"--ctx {n_ctx} is too small (expected at least 4)")
    if len(ids) < n_ctx:
        raise ModelError(f"the text has {len(ids)} tokens, fewer than one window of {n_ctx} "
                         "(expected a longer text or a smaller --ctx)")
    out = []
    for start in range(0, len(ids) - n_ctx + 1, n_ctx):
        w = list(ids[start:start + n_ctx])
        if bos is not None:
            w[0] = bos
        out.append(w)
    return out


def perplexity(logits_of: Any, ids: Sequence[int], n_ctx: int, bos: int | None,
               base_logits_of: Any = None) -> Perplexity:
    """`logits_of(window) -> (n_ctx, vocab)` for the model (and the base model, optional)."""
    first = n_ctx // 2
    nll: list[np.ndarray] = []
    kl: list[np.ndarray] = []
    agree: list[np.ndarray] = []
    wins = windows(ids, n_ctx, bos)
    for w in wins:
        logp = log_softmax(logits_of(w)[first:n_ctx - 1])
        target = np.asarray(w[first + 1:])
        nll.append(-logp[np.arange(len(target)), target])
        if base_logits_of is not None:
            base = log_softmax(base_logits_of(w)[first:n_ctx - 1])
            kl.append(kl_divergence(base, logp))
            agree.append(base.argmax(axis=-1) == logp.argmax(axis=-1))
    all_nll = np.concatenate(nll)
    mean = float(all_nll.mean())
    sem = float(all_nll.std() / np.sqrt(max(len(all_nll) - 1, 1)))
    ppl = float(np.exp(mean))
    result = Perplexity(ppl, ppl * sem, mean, len(all_nll), len(wins), n_ctx, token_nll=all_nll)
    if kl:
        all_kl = np.concatenate(kl)
        result.kl_mean, result.kl_max = float(all_kl.mean()), float(all_kl.max())
        result.top1_agree = float(np.concatenate(agree).mean())
    return result


def evaluate(model_path: str, text: str, *, n_ctx: int | None = None,
             base_path: str | None = None, backend: str = "numpy",
             base_cache: dict | None = None) -> Perplexity:
    """Perplexity of a model file on `text` (KL against `base_path` when given). `base_cache`:
    a dict kept across calls with the same base and text, so the base's logits of each window
    are computed once for many files (a benchmark's saving; the figures are the same)."""
    from runtime.api import Model

    model = Model(model_path, backend=backend)
    ctx = n_ctx or min(512, model.config.context_length)
    if ctx > model.config.context_length:
        raise ModelError(f"--ctx {ctx} is larger than the model's context of "
                         f"{model.config.context_length} (expected at most that)")
    base = None
    if base_path is not None:
        base = Model(base_path, backend=backend)
        if base.config.vocab_size != model.config.vocab_size:
            raise ModelError(f"{base_path}: vocabulary of {base.config.vocab_size} tokens, "
                             f"but {model_path} has {model.config.vocab_size} (expected the "
                             "same model at another precision)")
    ids = model.tokenize(text, parse_special=False)
    tok = model.tokenizer
    add_bos = bool(ids) and tok.bos_id is not None and ids[0] == tok.bos_id
    base_logits = base.logits if base is not None else None
    if base is not None and base_cache is not None:
        def base_logits(window: Sequence[int]) -> np.ndarray:
            key = (str(base_path), tuple(window))
            if key not in base_cache:
                base_cache[key] = base.logits(window)
            return base_cache[key]
    same = base_cache is not None and base_path is not None and str(model_path) == str(base_path)
    return perplexity(base_logits if same else model.logits, ids, ctx,
                      tok.bos_id if add_bos else None, base_logits)
