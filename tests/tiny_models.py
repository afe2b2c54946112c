"""Tiny random-weight Hugging Face models for tests (no weights can be downloaded here)."""

from __future__ import annotations

from typing import Any


def tiny_hf_model(arch: str = "llama", *, vocab_size: int = 320, seed: int = 0,
                  **config: Any):
    """A 2-layer, width-256, GQA 8/2 model whose weights are drawn with std 0.08, larger than
    the default init so that logits are not flat and greedy choices are clear."""
    import torch
    import transformers

    torch.manual_seed(seed)
    common: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5)
    common.update(config)
    if arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    return model.eval()
