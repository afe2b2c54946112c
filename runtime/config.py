"""The hyper-parameters of a llama-family decoder, read from GGUF metadata or a HF config.json.

GGUF and Hugging Face name the same facts differently, and store the query/key weights in
different orders: llama.cpp's converter permutes Llama's q/k rows so that RoPE rotates adjacent
pairs ("normal" style), while Hugging Face checkpoints (and GGUF qwen2) rotate the two halves of
each head ("neox" style). `rope_style` records which one the weights need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from runtime.errors import ModelError

ARCHITECTURES = ("llama", "qwen2")
MAX_DIM = 1 << 20  # no llama-family dimension comes near this; larger means a corrupt file


@dataclass(frozen=True)
class RopeScaling:
    """How positions or frequencies are rescaled for long contexts."""

    kind: Literal["none", "linear", "llama3"] = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float
    rope_theta: float
    rope_dim: int
    rope_style: Literal["normal", "neox"]
    context_length: int
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tied_embeddings: bool = False
    qkv_bias: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                    "ffn_dim", "rope_dim", "context_length"):
            value = getattr(self, key)
            if not isinstance(value, int) or not 0 < value <= MAX_DIM * 16:
                raise ModelError(f"{key} = {value!r} is not valid (expected a positive integer)")
        if self.n_heads % self.n_kv_heads:
            raise ModelError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads "
                             f"{self.n_kv_heads} (expected grouped-query attention groups)")
        if self.rope_dim > self.head_dim or self.rope_dim % 2:
            raise ModelError(f"rope_dim {self.rope_dim} is not valid (expected an even number "
                             f"≤ head_dim {self.head_dim})")
        if not (self.norm_eps > 0 and math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ModelError("norm_eps and rope_theta must be positive and finite")


def _need(meta: dict[str, Any], key: str, kind: type | tuple[type, ...], source: str) -> Any:
    if key not in meta:
        raise ModelError(f"{source}: metadata {key} is missing (expected {_kind_name(kind)})")
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ModelError(f"{source}: metadata {key} = {value!r:.60} is not valid "
                         f"(expected {_kind_name(kind)})")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {"int": "an integer", "float": "a number", "str": "a string"}
    return " or ".join(names.get(k.__name__, k.__name__) for k in kinds)


def config_from_gguf(meta: dict[str, Any], source: str, vocab_size: int,
                     has_output: bool, has_rope_freqs: bool) -> ModelConfig:
    arch = _need(meta, "general.architecture", str, source)
    if arch not in ARCHITECTURES:
        raise ModelError(f"{source}: architecture {arch!r} is not supported "
                         f"(expected one of: {', '.join(ARCHITECTURES)})")
    number = (int, float)
    dim = _need(meta, f"{arch}.embedding_length", int, source)
    n_heads = _need(meta, f"{arch}.attention.head_count", int, source)
    n_kv = meta.get(f"{arch}.attention.head_count_kv", n_heads)
    head_dim = meta.get(f"{arch}.attention.key_length", dim // max(n_heads, 1))
    scaling = RopeScaling()
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if has_rope_freqs:
        scaling = RopeScaling(kind="llama3")  # factors come from the rope_freqs tensor
    elif kind == "linear":
        scaling = RopeScaling(kind="linear",
                              factor=float(_need(meta, f"{arch}.rope.scaling.factor", number,
                                                 source)))
    elif kind not in ("none", None):
        raise ModelError(f"{source}: rope scaling {kind!r} is not supported "
                         "(expected none, linear, or llama3 rope_freqs)")
    return ModelConfig(
        arch=arch,
        vocab_size=vocab_size,
        dim=dim,
        n_layers=_need(meta, f"{arch}.block_count", int, source),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn_dim=_need(meta, f"{arch}.feed_forward_length", int, source),
        norm_eps=float(_need(meta, f"{arch}.attention.layer_norm_rms_epsilon", number, source)),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_dim=meta.get(f"{arch}.rope.dimension_count", head_dim),
        rope_style="normal" if arch == "llama" else "neox",
        context_length=_need(meta, f"{arch}.context_length", int, source),
        rope_scaling=scaling,
        tied_embeddings=not has_output,
        qkv_bias=arch == "qwen2",
        name=str(meta.get("general.name", "")),
    )


def config_from_hf(cfg: dict[str, Any], source: str) -> ModelConfig:
    model_type = cfg.get("model_type")
    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}.get(str(model_type))
    if arch is None:
        raise ModelError(f"{source}: model_type {model_type!r} is not supported "
                         "(expected llama, mistral or qwen2)")
    dim = _need(cfg, "hidden_size", int, source)
    n_heads = _need(cfg, "num_attention_heads", int, source)
    head_dim = cfg.get("head_dim") or dim // n_heads
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    if rope_type == "llama3":
        scaling = RopeScaling("llama3", float(rope["factor"]), float(rope["low_freq_factor"]),
                              float(rope["high_freq_factor"]),
                              int(rope["original_max_position_embeddings"]))
    elif rope_type == "linear":
        scaling = RopeScaling("linear", float(rope["factor"]))
    elif rope_type in ("default", None):
        scaling = RopeScaling()
    else:
        raise ModelError(f"{source}: rope_scaling type {rope_type!r} is not supported "
                         "(expected default, linear or llama3)")
    return ModelConfig(
        arch=arch,
        vocab_size=_need(cfg, "vocab_size", int, source),
        dim=dim,
        n_layers=_need(cfg, "num_hidden_layers", int, source),
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        ffn_dim=_need(cfg, "intermediate_size", int, source),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_dim=head_dim,
        rope_style="neox",
        context_length=int(cfg.get("max_position_embeddings", 2048)),
        rope_scaling=scaling,
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
        name=str(cfg.get("_name_or_path", "")),
    )
