"""A Llama GGUF big enough for memory-budget tests (tens to hundreds of MB), written fast and
without torch: seeded random Q8_0 weights, distinct per layer, and the self-test's tiny
SentencePiece vocabulary so that `claw runtime generate` can tokenize a prompt."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_stream_model(path: Path, *, n_layers: int = 8, dim: int = 256, ffn_dim: int = 768,
                       n_heads: int = 8, n_kv_heads: int = 4, qtype: str = "Q8_0",
                       seed: int = 0) -> Path:
    import gguf

    from runtime.config import ModelConfig
    from runtime.convert import _write_metadata
    from runtime.model_file import expected_shapes
    from runtime.quant import quantize
    from runtime.selftest import tiny_vocabulary

    T = gguf.GGMLQuantizationType
    tokens, scores, types = tiny_vocabulary()
    cfg = ModelConfig(arch="llama", name="clawforge-stream-test", vocab_size=len(tokens),
                      dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                      head_dim=dim // n_heads, ffn_dim=ffn_dim, norm_eps=1e-5,
                      rope_theta=10000.0, rope_dim=dim // n_heads, rope_style="normal",
                      context_length=512)
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(tmp, "llama")
    _write_metadata(w, cfg, T[qtype], {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0})
    for name, shape in expected_shapes(cfg).items():
        if len(shape) == 1:
            w.add_tensor(name, np.ones(shape, np.float32))
            continue
        std = 0.08 if name in ("token_embd.weight", "output.weight") else 1.0 / np.sqrt(shape[1])
        data = (rng.standard_normal(shape, np.float32) * std).astype(np.float32)
        if name == "output.weight":
            data[:259] *= 0.1  # special and byte tokens rarely win: the text is readable
        w.add_tensor(name, quantize(data, T[qtype]), raw_dtype=T[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path
