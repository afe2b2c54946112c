"""The reference forward pass of a llama-family decoder, in numpy.

Written to be read top to bottom next to the model's definition: embedding → for each layer
(RMSNorm → attention with RoPE, KV cache and grouped-query heads → residual → RMSNorm → SwiGLU
MLP → residual) → RMSNorm → output head. Shapes are in the comments: T new tokens, S cached
positions, H query heads, KV key/value heads, D head size, C model width, F FFN width.
Weights come from a `WeightStore`: without a memory plan every weight is dequantized to float32
when first used and kept; under a plan (runtime/memory_plan.py) some layers stay quantized and
are dequantized tile by tile, and some stream from disk a layer ahead of use, so a model larger
than the budget runs with the same tokens (slower). Like llama.cpp, products with quantized
weights (every type but F32/F16) round their input to Q8_0 blocks first (WeightStore.matmul,
in every tier), which is what the OpenCL backend's integer kernels compute too. Attention
runs per block of queries so that its score matrix stays under the plan's bound, whatever the
prompt length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from runtime.backends import Backend, KVCache
from runtime.backends.weight_stream import WeightStore
from runtime.config import ModelConfig
from runtime.memory_plan import ATTENTION_SCRATCH, Plan, make_plan
from runtime.model_file import ModelSource


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x²) + eps) · weight, over the last axis."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def rope_inv_freq(cfg: ModelConfig, freq_factors: np.ndarray | None) -> np.ndarray:
    """θ_i = base^(-2i/d) for i < d/2, rescaled for long contexts (Llama 3 / linear)."""
    d = cfg.rope_dim
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)  # (d/2,)
    s = cfg.rope_scaling
    if freq_factors is not None:  # GGUF stores Llama 3's per-frequency divisors as a tensor
        inv = inv / freq_factors.astype(np.float64)
    elif s.kind == "llama3":  # Llama 3.1's rule: slow the low frequencies, keep the high ones
        wavelen = 2 * np.pi / inv
        low_wavelen = s.original_context / s.low_freq_factor
        high_wavelen = s.original_context / s.high_freq_factor
        smooth = (s.original_context / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        blended = (1 - smooth) * inv / s.factor + smooth * inv
        inv = np.where(wavelen > low_wavelen, inv / s.factor,
                       np.where(wavelen < high_wavelen, inv, blended))
    return inv


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, style: str) -> np.ndarray:
    """Rotate x (T, heads, D) by position. `normal` pairs (0,1),(2,3)…; `neox` pairs (i, i+d/2)."""
    d = cos.shape[-1] * 2
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, d/2)
    out = x.copy()
    if style == "normal":
        x0, x1 = x[..., 0:d:2], x[..., 1:d:2]
        out[..., 0:d:2] = x0 * cos - x1 * sin
        out[..., 1:d:2] = x0 * sin + x1 * cos
    else:
        x0, x1 = x[..., : d // 2], x[..., d // 2: d]
        out[..., : d // 2] = x0 * cos - x1 * sin
        out[..., d // 2: d] = x1 * cos + x0 * sin
    return out


class NumpyBackend(Backend):
    name = "numpy"

    def __init__(self, source: ModelSource, *, memory_budget: int | None = None,
                 plan: Plan | None = None):
        """`plan` places the weights; a bare `memory_budget` plans for the weights and scratch
        alone (no interpreter baseline) with a 256-token context."""
        super().__init__(source)
        if plan is None and memory_budget is not None:
            plan = make_plan(source, memory_budget, n_ctx=256, baseline=0)
        self.plan = plan
        self.w = WeightStore(source, plan)
        factors = source.tensors.get("rope_freqs.weight")
        self.inv_freq = rope_inv_freq(self.config,
                                      factors.to_float32() if factors is not None else None)

    def embed(self, tokens: Sequence[int]) -> np.ndarray:
        """Rows of the embedding table, dequantized one token at a time: (T, C)."""
        table = self.source.tensors["token_embd.weight"]
        return np.concatenate([table.rows(t, t + 1) for t in tokens])

    def qkv(self, x: np.ndarray, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Query, key and value rows for x (T, C): (T, H, D), (T, KV, D), (T, KV, D)."""
        cfg, w, b = self.config, self.w, f"blk.{layer}."
        T, H, KV, D = x.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q, k, v = w.matmul(x, b + "attn_q.weight"), w.matmul(x, b + "attn_k.weight"), \
            w.matmul(x, b + "attn_v.weight")  # (T, H·D), (T, KV·D), (T, KV·D)
        if cfg.qkv_bias:
            q, k, v = q + w(b + "attn_q.bias"), k + w(b + "attn_k.bias"), v + w(b + "attn_v.bias")
        return q.reshape(T, H, D), k.reshape(T, KV, D), v.reshape(T, KV, D)

    def attend(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, layer: int,
               cache: KVCache) -> np.ndarray:
        """Rotate q, k to their positions, append k, v to the cache, attend: (T, H·D)."""
        cfg = self.config
        T, H, KV, D = q.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        start = cache.length
        positions = np.arange(start, start + T, dtype=np.float64)
        if cfg.rope_scaling.kind == "linear":
            positions = positions / cfg.rope_scaling.factor
        angles = positions[:, None] * self.inv_freq[None, :]  # (T, rope_dim/2)
        cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        r = cfg.rope_dim
        q[..., :r] = apply_rope(q[..., :r], cos, sin, cfg.rope_style)
        k[..., :r] = apply_rope(k[..., :r], cos, sin, cfg.rope_style)

        cache.k[layer, start:start + T] = k
        cache.v[layer, start:start + T] = v
        S = start + T
        keys, values = cache.k[layer, :S], cache.v[layer, :S]  # (S, KV, D)

        # Grouped-query attention: query head h reads key/value head h // (H / KV). Queries go
        # in blocks so that the (H, rows, S) scores stay under ATTENTION_SCRATCH.
        group = H // KV
        qg = q.reshape(T, KV, group, D).transpose(1, 2, 0, 3)  # (KV, G, T, D)
        kt, vt = keys.transpose(1, 2, 0)[:, None], values.transpose(1, 0, 2)[:, None]
        rows = max(1, ATTENTION_SCRATCH // (3 * 4 * H * S))
        out = np.empty((KV, group, T, D), np.float32)
        for r in range(0, T, rows):
            scores = qg[:, :, r:r + rows] @ kt / math.sqrt(D)  # (KV, G, rows, S)
            pos = start + r + np.arange(scores.shape[2])
            scores[..., np.arange(S)[None, :] > pos[:, None]] = -np.inf  # the future
            out[:, :, r:r + rows] = softmax(scores) @ vt  # (KV, G, rows, D)
        return out.transpose(2, 0, 1, 3).reshape(T, H * D)

    def attention(self, x: np.ndarray, layer: int, cache: KVCache) -> np.ndarray:
        out = self.attend(*self.qkv(x, layer), layer, cache)
        return self.w.matmul(out, f"blk.{layer}.attn_output.weight")  # (T, C)

    def mlp(self, x: np.ndarray, layer: int) -> np.ndarray:
        w, b = self.w, f"blk.{layer}."
        gate = silu(w.matmul(x, b + "ffn_gate.weight"))  # (T, F)
        return w.matmul(gate * w.matmul(x, b + "ffn_up.weight"), b + "ffn_down.weight")  # (T, C)

    def layer(self, x: np.ndarray, layer: int, cache: KVCache) -> np.ndarray:
        """One transformer block on x (T, C) at the cache's length (the planner times it)."""
        cfg, w, b = self.config, self.w, f"blk.{layer}."
        x = x + self.attention(rms_norm(x, w(b + "attn_norm.weight"), cfg.norm_eps), layer, cache)
        return x + self.mlp(rms_norm(x, w(b + "ffn_norm.weight"), cfg.norm_eps), layer)

    def forward(self, tokens: Sequence[int], cache: KVCache, *,
                all_logits: bool = False) -> np.ndarray:
        self.check_room(tokens, cache)
        cfg, w = self.config, self.w
        x = self.embed(tokens)  # (T, C)
        for layer in range(cfg.n_layers):
            w.enter(layer)
            x = self.layer(x, layer, cache)
            w.leave(layer)
        cache.length += len(tokens)
        assert x.dtype == np.float32, "a float64 value leaked into the forward pass"
        x = x if all_logits else x[-1:]
        return self.head(x)

    def head(self, x: np.ndarray) -> np.ndarray:
        """Final norm and output projection (the head is the plan's last unit): (T, vocab)."""
        cfg, w = self.config, self.w
        x = rms_norm(x, w("output_norm.weight"), cfg.norm_eps)
        w.enter(cfg.n_layers)
        logits = w.matmul(x, "token_embd.weight" if cfg.tied_embeddings else "output.weight")
        w.leave(cfg.n_layers)
        return logits

    def forward_batch(self, tokens: Sequence[int], caches: Sequence[KVCache]) -> np.ndarray:
        """One decode step for B sequences with the B rows stacked, so every weight matrix is
        read once per step for all of them; only attention runs per sequence (each has its
        own cache and length). Returns logits (B, vocab)."""
        for t, c in zip(tokens, caches, strict=True):
            self.check_room([t], c)
        cfg, w = self.config, self.w
        x = self.embed(tokens)  # (B, C)
        for layer in range(cfg.n_layers):
            b = f"blk.{layer}."
            w.enter(layer)
            q, k, v = self.qkv(rms_norm(x, w(b + "attn_norm.weight"), cfg.norm_eps), layer)
            out = np.concatenate([self.attend(q[i:i + 1], k[i:i + 1], v[i:i + 1], layer, c)
                                  for i, c in enumerate(caches)])  # (B, H·D)
            x = x + w.matmul(out, b + "attn_output.weight")
            x = x + self.mlp(rms_norm(x, w(b + "ffn_norm.weight"), cfg.norm_eps), layer)
            w.leave(layer)
        for c in caches:
            c.length += 1
        return self.head(x)  # (B, vocab)
