"""A tiny chat model as a GGUF file for the server tests and benchmark: a byte-level BPE
tokenizer with Llama 3's special tokens and chat template, and random 2-layer weights."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def tiny_chat_gguf(folder: Path, *, seed: int = 3, **config: object) -> Path:
    """Write `folder`/tiny.gguf (Q8_0) and return its path (kept if it exists)."""
    out = folder / "tiny.gguf"
    if out.exists():
        return out
    from gguf import GGMLQuantizationType

    from runtime.convert import convert, tokenizer_metadata
    from tests.tiny_models import tiny_hf_model
    from tests.unit import tokenizer_fixtures as fx

    hf = folder / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    tok = fx.train_byte_level("llama3")
    fx.save(tok, hf, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                      "chat_template": CHAT_TEMPLATE})
    model = tiny_hf_model(vocab_size=tok.get_vocab_size(with_added_tokens=True), seed=seed,
                          bos_token_id=tok.token_to_id("<|begin_of_text|>"),
                          eos_token_id=tok.token_to_id("<|eot_id|>"), **config)
    model.save_pretrained(hf, safe_serialization=True)
    tmp = folder / "tiny.gguf.part"
    convert(hf, tmp, GGMLQuantizationType.Q8_0, tokenizer_metadata=tokenizer_metadata(hf))
    tmp.rename(out)
    return out
