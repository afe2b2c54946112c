"""Tiny tokenizers trained in-test with the reference libraries, and their GGUF metadata.

Nothing can be downloaded, so every reference tokenizer is trained here on a small corpus
(a second or two) with `sentencepiece` and `tokenizers`, then converted into GGUF tokenizer
metadata the way llama.cpp's convert_hf_to_gguf.py writes it, or into tokenizer.json variants
of the kinds llama-family models ship. Tests compare `runtime.tokenizer` against these.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import sentencepiece as spm
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

# Lines the tests encode and decode: accents, combining marks, CJK, Arabic, emoji (ZWJ
# families, skin tones, flags), code, whitespace runs, digits, and special tokens in text.
CORPUS = [
    "Hello world",
    "Hello, world! How are you doing today?",
    " leading space",
    "trailing space ",
    "  two leading, three trailing   ",
    "multiple    spaces   inside",
    "tabs\tand\t\ttabs",
    "line one\nline two\n\nline four\r\nwindows line",
    "\n\n\nstarts with newlines",
    "ends with newlines\n\n",
    "   ",
    "\t",
    "",
    "Café naïve résumé Ångström façade São Paulo",
    "decomposed: Cafe\u0301 and n\u0303 and Z\u0324\u0354\u0367\u0311\u0313",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "مرحبا بالعالم، كيف حالك؟",
    "emoji 👍 👍🏽 👍🏿 and a family 👨\u200d👩\u200d👧\u200d👦 and flags 🇯🇵🇫🇷",
    "rare emoji 🦜🪿 and symbols ∮ ∑ ≠ ∞ ☃ ⌘",
    "def add(a, b):\n    return a + b\n\nclass Foo:\n    def __init__(self):\n        pass\n",
    "if (x > 0) {\n\treturn x * 2;\n} else {\n\treturn -x;\n}",
    "for i in range(10):\n        print(f\"{i:03d}\")  # comment",
    "digits 0123456789 and 3.14159 and 1,000,000 and 2024-01-31",
    "numbers ١٢٣ ٤٥٦ and ½ ² ³ and Ⅻ",
    "contractions: don't I'M we'LL they've she'd it's YOU'RE",
    "<|begin_of_text|>Hello<|eot_id|>",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<s>[INST] hi [/INST] there</s>",
    "x<tool>y and <tool> spaced <tool>",
    "partial specials: <|eot_id| <|im_end <s </s",
    "unicode spaces:\u00a0nbsp,\u3000ideographic,\u2009thin,\u2028line sep",
    "control chars: a\x1cb \x1f c \x00 d \x7f e",
    "newer unicode: \u1c89\u1c8a \U00031350 \U0001e4f0",
    "mixed: Ünïcödé 123abc!!! ???\n\t  end",
    "a",
    "!!!",
    "https://example.com/path?query=1&b=2#frag",
    "  \n  \n",
]

# Text to train on: varied enough that merges cover words, code, CJK and emoji.
_TRAIN = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello there!",
    "How are you doing today? I am doing well, thank you for asking.",
    "Café naïve résumé Ångström façade São Paulo, crème brûlée, jalapeño.",
    "日本語のテキストと中文文本，这是一个测试。我们喜欢学习语言。",
    "한국어 텍스트 입니다. 안녕하세요 세계.",
    "مرحبا بالعالم، كيف حالك؟ أنا بخير شكرا.",
    "emoji 👍 👍🏽 😀 😂 ❤️ 👨\u200d👩\u200d👧 🇯🇵",
    "def add(a, b):\n    return a + b\n",
    "class Foo:\n    def __init__(self):\n        self.x = 0\n",
    "for i in range(10):\n    print(i)\n",
    "if (x > 0) {\n\treturn x * 2;\n} else {\n\treturn -x;\n}\n",
    "numbers 0123456789 3.14159 1,000,000 2024-01-31 42 7 99",
    "don't won't can't it's they're we've I'm you'll she'd",
    "line one\nline two\n\nline four\r\nwindows line\ttab",
    "multiple    spaces   inside   and   out",
    "https://example.com/path?query=1&b=2 user@example.org",
]
TRAIN_CORPUS = _TRAIN * 8

LLAMA3_HF_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                     r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_HF_PATTERN = LLAMA3_HF_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
GPT2_HF_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

SP_USER_DEFINED = ["<tool>"]


# ------------------------------------------------------------------------------------------
# SentencePiece (Llama-2 style) and its GGUF / tokenizer.json conversions.

def train_sentencepiece() -> bytes:
    """A BPE sentencepiece model like Llama's: byte fallback, identity normalization,
    no extra-whitespace removal, digits split, one user-defined symbol."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN_CORPUS), model_writer=out, model_type="bpe",
        vocab_size=700, hard_vocab_limit=False, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, character_coverage=0.995, user_defined_symbols=SP_USER_DEFINED,
        allow_whitespace_only_pieces=True, minloglevel=2, num_threads=1)
    return out.getvalue()


def sp_processor(model: bytes) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=model)


def sp_types(sp: spm.SentencePieceProcessor) -> list[int]:
    """GGUF token types, as llama.cpp's converter assigns them (user-defined pieces come
    out as USER_DEFINED through tokenizer_config's added tokens)."""
    types = []
    for i in range(sp.get_piece_size()):
        if sp.is_unknown(i):
            types.append(2)
        elif sp.is_control(i):
            types.append(3)
        elif sp.is_unused(i):
            types.append(5)
        elif sp.is_byte(i):
            types.append(6)
        elif sp.id_to_piece(i) in SP_USER_DEFINED:
            types.append(4)
        else:
            types.append(1)
    return types


def sp_gguf_meta(sp: spm.SentencePieceProcessor) -> dict[str, Any]:
    n = sp.get_piece_size()
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": sp_types(sp),
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": True,
    }


def sp_to_hf(sp: spm.SentencePieceProcessor, style: str) -> Tokenizer:
    """The SentencePiece model as a Llama-2 style tokenizer.json (BPE + byte fallback).

    style "legacy": Prepend("▁") + Replace(" ", "▁") normalizer (Llama-2's file);
    "metaspace": Metaspace(prepend_scheme="first", split=False) pre-tokenizer (legacy=False);
    "metaspace-split": Metaspace(always, split=True) with the Metaspace decoder.
    """
    n = sp.get_piece_size()
    types = sp_types(sp)
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    normal = {sp.id_to_piece(i): i for i in range(n) if types[i] == 1}
    ranked = []
    for piece, pid in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-sp.get_score(pid), pid, left, right))
    merges = [(left, right) for _, _, left, right in sorted(ranked)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True))
    tok.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False)
                            for i in range(n) if types[i] in (2, 3)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in SP_USER_DEFINED])
    strip_decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                       decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    if style == "legacy":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                               normalizers.Replace(" ", "▁")])
        tok.decoder = strip_decoder
    elif style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                     split=False)
        tok.decoder = strip_decoder
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always",
                                                     split=True)
        tok.decoder = decoders.Sequence([decoders.ByteFallback(),
                                         decoders.Metaspace(replacement="▁",
                                                            prepend_scheme="always")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", sp.bos_id())])
    return tok


# ------------------------------------------------------------------------------------------
# Byte-level BPE (Llama-3 / Qwen2 style) and its GGUF conversion.

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
                   "<|start_header_id|>", "<|end_header_id|>"]
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_byte_level(style: str) -> Tokenizer:
    """A byte-level BPE in the style of one model family.

    "llama3": Llama 3's split regex (3-digit groups), ignore_merges, BOS template;
    "qwen2": Qwen2's regex (single digits), no BOS; "smollm": Digits + GPT-2 ByteLevel regex;
    "default": llama.cpp's fallback splitter (four regexes in turn).
    """
    specials = LLAMA3_SPECIALS if style == "llama3" else QWEN2_SPECIALS
    split = {"llama3": [LLAMA3_HF_PATTERN], "qwen2": [QWEN2_HF_PATTERN],
             "default": [r"[\p{P}\$\+<=>\^~\|]+", GPT2_HF_PATTERN, r"\p{N}+",
                         r"[0-9][0-9][0-9]"]}.get(style)
    tok = Tokenizer(models.BPE())
    if split is None:  # smollm
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            *(pre_tokenizers.Split(Regex(p), behavior="isolated") for p in split),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN_CORPUS, trainer)
    tok.add_tokens([AddedToken("<tool>", special=False, normalized=False)])
    if style == "llama3":
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                          pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                          special_tokens=[("<|begin_of_text|>", bos)])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    data = json.loads(tok.to_str())
    data["model"]["ignore_merges"] = style == "llama3"
    return Tokenizer.from_str(json.dumps(data))


def byte_level_gguf_meta(tok: Tokenizer, pre: str, *, bos: str | None,
                         eos: str) -> dict[str, Any]:
    """GGUF metadata as convert_hf_to_gguf.py writes it for a "gpt2" vocabulary."""
    data = json.loads(tok.to_str())
    added = {t["id"]: t for t in data["added_tokens"]}
    size = tok.get_vocab_size(with_added_tokens=True)
    tokens, types = [], []
    for i in range(size):
        text = tok.id_to_token(i)
        tokens.append(text)
        types.append((3 if added[i]["special"] else 4) if i in added else 1)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": tok.token_to_id(eos),
        "tokenizer.ggml.add_bos_token": bos is not None,
    }
    if bos is not None:
        meta["tokenizer.ggml.bos_token_id"] = tok.token_to_id(bos)
    return meta


def with_tricky_added_tokens(tok: Tokenizer) -> Tokenizer:
    """A copy with Qwen2's NFC normalizer and added tokens that use lstrip/rstrip,
    single_word and normalized=True."""
    copy = Tokenizer.from_str(tok.to_str())
    copy.normalizer = normalizers.NFC()
    copy.add_special_tokens([AddedToken("<mask>", lstrip=True, rstrip=True, special=True,
                                        normalized=False)])
    copy.add_tokens([AddedToken("Foo", single_word=True, special=False, normalized=False),
                     AddedToken("wor ld", special=False, normalized=True)])
    return copy


def save(tok: Tokenizer, folder: Path, config: dict[str, Any] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tokenizer.json"
    tok.save(str(path))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path
