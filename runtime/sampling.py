"""Choosing the next token from logits: penalties, truncation (top-k, top-p, min-p),
temperature, then a seeded draw. The order is llama.cpp's default sampler chain, so the same
settings mean the same thing as in llama.cpp. Temperature 0 is greedy (argmax)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from runtime.errors import ModelError


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    max_tokens: int = 128
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        checks = [
            ("temperature", self.temperature >= 0, "≥ 0"),
            ("top_k", self.top_k >= 0, "≥ 0 (0 disables)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", 0 <= self.min_p < 1, "in [0, 1)"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
            ("repeat_last_n", self.repeat_last_n >= 0, "≥ 0"),
            ("max_tokens", self.max_tokens >= 1, "≥ 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ModelError(f"{name} = {getattr(self, name)!r} is not valid "
                                 f"(expected {expected})")

    @classmethod
    def greedy(cls, **kwargs: object) -> SamplingParams:
        return cls(temperature=0.0, **kwargs)  # type: ignore[arg-type]


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        self.rng = np.random.default_rng(params.seed)

    def penalize(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """CTRL-style repetition penalty on recently seen tokens (divide if > 0, else multiply)."""
        p = self.p
        if p.repetition_penalty == 1.0 or not history or p.repeat_last_n == 0:
            return logits
        seen = np.unique(np.asarray(history[-p.repeat_last_n:]))
        logits = logits.copy()
        vals = logits[seen]
        logits[seen] = np.where(vals > 0, vals / p.repetition_penalty,
                                vals * p.repetition_penalty)
        return logits

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        p = self.p
        logits = self.penalize(np.asarray(logits, np.float64), history)
        if p.temperature == 0:
            return int(np.argmax(logits))
        ids = np.argsort(-logits, kind="stable")  # candidates, best first
        if p.top_k > 0:
            ids = ids[: p.top_k]
        probs = np.exp(logits[ids] - logits[ids[0]])
        probs /= probs.sum()
        if p.top_p < 1.0:  # smallest prefix whose mass reaches top_p
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            ids, probs = ids[:keep], probs[:keep]
        if p.min_p > 0:  # drop tokens less likely than min_p × the best one
            keep_mask = probs >= p.min_p * probs[0]
            ids = ids[keep_mask]
        scaled = logits[ids] / p.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        return int(ids[self.rng.choice(len(ids), p=probs)])
