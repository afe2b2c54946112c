"""A Llama GGUF big enough for memory-budget tests (tens to hundreds of MB), written fast and
without torch: seeded random Q8_0 weights, distinct per layer, and the self-test's tiny
SentencePiece vocabulary so that `claw runtime generate` can tokenize a prompt.

The Q8_0 blocks are drawn directly (uniform int8 values, a jittered fp16 scale per block)
rather than quantized from floats: ~10x faster, and a model of 250 MB takes seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def q8_0_blocks(rng: np.random.Generator, shape: tuple[int, int], std: float) -> np.ndarray:
    """Random Q8_0 bytes of a (rows, cols) matrix whose values have standard deviation ~std."""
    n = shape[0] * shape[1] // 32
    blocks = np.empty((n, 34), np.uint8)
    scale = std / 73.3 * rng.uniform(0.8, 1.2, n)  # uniform int8 in ±127 has std 73.3
    blocks[:, :2] = scale.astype(np.float16).view(np.uint8).reshape(n, 2)
    blocks[:, 2:] = rng.integers(-127, 128, (n, 32), np.int8).view(np.uint8)
    return blocks.reshape(shape[0], shape[1] // 32 * 34)


def write_stream_model(path: Path, *, n_layers: int = 8, dim: int = 256, ffn_dim: int = 768,
                       n_heads: int = 8, n_kv_heads: int = 4, seed: int = 0) -> Path:
    import gguf

    from runtime.config import ModelConfig
    from runtime.convert import _write_metadata
    from runtime.model_file import expected_shapes
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
    _write_metadata(w, cfg, T.Q8_0, {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0})
    for name, shape in expected_shapes(cfg).items():
        if len(shape) == 1:
            w.add_tensor(name, np.ones(shape, np.float32))
            continue
        std = 0.08 if name in ("token_embd.weight", "output.weight") else 1.0 / np.sqrt(shape[1])
        blocks = q8_0_blocks(rng, shape, std)
        if name == "output.weight":  # special and byte tokens rarely win: the text is readable
            blocks[:259] = q8_0_blocks(rng, (259, shape[1]), std * 0.1)
        w.add_tensor(name, blocks, raw_dtype=T.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path
