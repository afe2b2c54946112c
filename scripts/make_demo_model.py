"""Make a small Llama-shaped Hugging Face model for `make demo`: no weights can be downloaded
here, so the weights are random and the byte-level BPE tokenizer is trained on this
repository's own text. Usage: make_demo_model.py OUT_DIR (kept if it already exists)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parent.parent
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>"]
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
         r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")  # Llama 3's split
CHAT = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
        "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
        "{% endif %}")


def train_tokenizer() -> Tokenizer:
    text = [p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *ROOT.glob("*/*.py")]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=2048, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = tok.token_to_id(SPECIALS[0])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIALS[0]} $A", special_tokens=[(SPECIALS[0], bos)])
    return tok


def main(out: Path) -> None:
    if (out / "config.json").exists():
        print(f"{out}: already made")
        return
    import torch
    import transformers

    tok = train_tokenizer()
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": SPECIALS[0], "eos_token": "<|eot_id|>", "chat_template": CHAT}))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=512, intermediate_size=1536,
        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
        max_position_embeddings=2048, bos_token_id=tok.token_to_id(SPECIALS[0]),
        eos_token_id=tok.token_to_id("<|eot_id|>"))
    transformers.LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    print(f"{out}: Llama, {config.num_hidden_layers} layers, width {config.hidden_size}, "
          f"vocab {config.vocab_size} (random weights)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
