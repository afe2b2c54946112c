"""runtime.tokenizer against the reference libraries, on tokenizers trained in-test.

Each case pairs our tokenizer with its reference: `sentencepiece` for GGUF "llama" metadata
(converted as llama.cpp's converter does), and Hugging Face `tokenizers` for GGUF "gpt2"
metadata and for tokenizer.json files (byte-level and Llama-2 style). Encoding, decoding
(of our ids, of the reference's ids, of random id sequences) and streaming must all be equal.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Regex, pre_tokenizers
from tokenizers import Tokenizer as HFReference

from runtime.tokenizer import (
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    tokenizer_from_gguf,
    tokenizer_from_json,
)
from tests.unit import tokenizer_fixtures as fx

pytestmark = pytest.mark.unit


@dataclass
class Case:
    """Our tokenizer and the reference it must equal."""

    ours: Tokenizer
    # (text, parse_special, add_special) -> reference ids
    ref_encode: Callable[[str, bool, bool], list[int]]
    # (ids, skip_special) -> reference text, or None where the reference has no such mode
    ref_decode: Callable[[list[int], bool], str | None]
    byte_ids: list[int]  # ids that stand for single bytes (to build broken UTF-8)


def _hf_case(ours: Tokenizer, ref: HFReference) -> Case:
    def encode(text: str, parse_special: bool, add_special: bool) -> list[int]:
        ref.encode_special_tokens = not parse_special
        try:
            return ref.encode(text, add_special_tokens=add_special).ids
        finally:
            ref.encode_special_tokens = False

    size = ref.get_vocab_size(with_added_tokens=True)
    byte_ids = [i for i in range(size) if re.fullmatch(r"<0x[0-9A-F]{2}>", ref.id_to_token(i)
                                                      or "")]
    if not byte_ids:  # byte-level: single-character tokens are single bytes
        byte_ids = [i for i in range(size) if len(ref.id_to_token(i) or "") == 1]
    return Case(ours, encode, lambda ids, skip: ref.decode(ids, skip_special_tokens=skip),
                byte_ids)


def _sp_case(model: bytes) -> Case:
    sp = fx.sp_processor(model)
    ours = tokenizer_from_gguf(fx.sp_gguf_meta(sp))
    specials = sorted((sp.id_to_piece(i) for i in range(sp.get_piece_size())
                       if sp.is_control(i) or sp.is_unknown(i)), key=len, reverse=True)
    special_re = re.compile("|".join(map(re.escape, specials)))

    def encode(text: str, parse_special: bool, add_special: bool) -> list[int]:
        # llama.cpp: cut at control tokens, each text fragment encoded on its own.
        ids = [sp.bos_id()] if add_special else []
        if not parse_special:
            return [*ids, *sp.encode(text)]
        pos = 0
        for m in special_re.finditer(text):
            ids += [*sp.encode(text[pos:m.start()]), sp.piece_to_id(m.group())]
            pos = m.end()
        return ids + sp.encode(text[pos:])

    def decode(ids: list[int], skip: bool) -> str | None:
        return sp.decode(ids) if skip else None  # sentencepiece never prints control tokens

    byte_ids = [i for i in range(sp.get_piece_size()) if sp.is_byte(i)]
    return Case(ours, encode, decode, byte_ids)


@pytest.fixture(scope="session")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("tokenizers")
    sp_model = fx.train_sentencepiece()
    sp = fx.sp_processor(sp_model)
    out = {"gguf-llama": _sp_case(sp_model)}
    byte_level = {style: fx.train_byte_level(style)
                  for style in ("llama3", "qwen2", "smollm", "default")}
    gguf = {"llama3": ("llama-bpe", "<|begin_of_text|>", "<|eot_id|>"),
            "qwen2": ("qwen2", None, "<|im_end|>"), "smollm": ("smollm", None, "<|im_end|>"),
            "default": ("default", None, "<|endoftext|>")}
    for style, (pre, bos, eos) in gguf.items():
        ref = byte_level[style]
        meta = fx.byte_level_gguf_meta(ref, pre, bos=bos, eos=eos)
        out[f"gguf-gpt2-{pre}"] = _hf_case(tokenizer_from_gguf(meta), ref)
    json_refs = {
        "json-llama3": byte_level["llama3"],
        "json-qwen2": byte_level["qwen2"],
        "json-tricky-added": fx.with_tricky_added_tokens(byte_level["qwen2"]),
        "json-llama2-legacy": fx.sp_to_hf(sp, "legacy"),
        "json-llama2-metaspace": fx.sp_to_hf(sp, "metaspace"),
        "json-llama2-metaspace-split": fx.sp_to_hf(sp, "metaspace-split"),
    }
    for name, tok in json_refs.items():
        path = fx.save(tok, root / name)
        out[name] = _hf_case(tokenizer_from_json(path), HFReference.from_file(str(path)))
    return out


ALL = ["gguf-llama", "gguf-gpt2-llama-bpe", "gguf-gpt2-qwen2", "gguf-gpt2-smollm",
       "gguf-gpt2-default", "json-llama3", "json-qwen2", "json-tricky-added",
       "json-llama2-legacy", "json-llama2-metaspace", "json-llama2-metaspace-split"]
EXTRA_LINES = ["a  <mask>  b", "a<mask>b", "aFoo b Foo b Foo_x", "hello wor ld", "<mask>",
               "x <mask> <mask>  y", "<unk> and <s> inside", "\u2581already\u2581escaped"]
LINES = fx.CORPUS + EXTRA_LINES
# Where the reference itself loses text: lstrip/rstrip tokens eat spaces; Metaspace "first"
# and the Metaspace decoder drop a leading space.
LOSSY = {"json-tricky-added", "json-llama2-metaspace", "json-llama2-metaspace-split"}


def _diff(case: Case, text: str, ours: list[int], ref: list[int]) -> str:
    tok = case.ours
    return (f"{text!r}\n ours: {[tok.token_text(i) for i in ours]}\n"
            f"  ref: {[tok.token_text(i) for i in ref]}")


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("parse_special", [True, False])
def test_encode_equals_reference(cases: dict[str, Case], name: str,
                                 parse_special: bool) -> None:
    case = cases[name]
    for text in LINES:
        ours = case.ours.encode(text, parse_special=parse_special)
        ref = case.ref_encode(text, parse_special, True)
        assert ours == ref, _diff(case, text, ours, ref)
        ours = case.ours.encode(text, add_bos=False, parse_special=parse_special)
        ref = case.ref_encode(text, parse_special, False)
        assert ours == ref, _diff(case, text, ours, ref)


@pytest.mark.parametrize("name", ALL)
def test_decode_equals_reference(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    for text in LINES:
        ref_ids = case.ref_encode(text, True, True)
        for skip in (False, True):
            want = case.ref_decode(ref_ids, skip)
            if want is None:
                continue
            assert case.ours.decode(ref_ids, skip_special=skip) == want, (text, skip)
            assert case.ours.decode(case.ours.encode(text), skip_special=skip) == want


@pytest.mark.parametrize("name", [n for n in ALL if n not in LOSSY])
def test_decode_of_encode_round_trips(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    for text in fx.CORPUS:
        if name == "json-llama2-legacy" and "<tool>" in text:
            continue  # Prepend("▁") gives the text after an added token its own "▁"
        ids = case.ours.encode(text, add_bos=False, parse_special=False)
        assert case.ours.decode(ids) == text


def test_gguf_llama_prints_control_tokens_like_the_llama2_tokenizer_json(
        cases: dict[str, Case]) -> None:
    """sentencepiece has no "print control tokens" mode; with skip_special=False the GGUF
    tokenizer prints them like `tokenizers` does for the same vocabulary ("<s> Hello")."""
    gguf, hf = cases["gguf-llama"], cases["json-llama2-legacy"]
    for text in LINES:
        if "<unk>" in text:
            continue  # sentencepiece prints <unk> as " ⁇ ", tokenizers as "<unk>"
        ids = gguf.ours.encode(text)
        assert gguf.ours.decode(ids) == hf.ref_decode(ids, False), text


def test_metaspace_first_drops_a_leading_space_like_the_reference(
        cases: dict[str, Case]) -> None:
    """Metaspace(prepend_scheme="first") does not add "▁" before a leading space, so the
    decoder's Strip eats the user's space: the reference loses it and so do we."""
    case = cases["json-llama2-metaspace"]
    ids = case.ours.encode(" leading", add_bos=False)
    assert case.ours.decode(ids) == case.ref_decode(ids, False) == "leading"


@pytest.mark.parametrize("name", ALL)
def test_decode_random_ids_equals_reference(cases: dict[str, Case], name: str) -> None:
    """Arbitrary id sequences, half single-byte tokens: broken UTF-8 everywhere."""
    case = cases[name]
    rng = random.Random(f"random-ids-{name}")
    for _ in range(400):
        ids = [rng.choice(case.byte_ids) if rng.random() < 0.5
               else rng.randrange(case.ours.vocab_size) for _ in range(rng.randint(0, 12))]
        for skip in (False, True):
            want = case.ref_decode(ids, skip)
            got = case.ours.decode(ids, skip_special=skip)
            if want is not None:
                assert got == want, ([case.ours.token_text(i) for i in ids], skip)
            stream = StreamDecoder(case.ours, skip_special=skip)
            assert "".join([*(stream.feed(i) for i in ids), stream.flush()]) == got


@pytest.mark.parametrize("name", ALL)
def test_stream_decoder_equals_decode(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    stream = StreamDecoder(case.ours)
    for text in LINES:
        ids = case.ours.encode(text)
        pieces = [stream.feed(i) for i in ids]
        assert "".join([*pieces, stream.flush()]) == case.ours.decode(ids)
        # nothing emitted is ever an unfinished character
        assert all("\ufffd" not in p for p in pieces) or "\ufffd" in case.ours.decode(ids)


@pytest.mark.parametrize("name", ["gguf-llama", "gguf-gpt2-llama-bpe", "json-llama3"])
def test_stream_holds_an_emoji_split_across_byte_tokens(cases: dict[str, Case],
                                                        name: str) -> None:
    tok = cases[name].ours
    ids = tok.encode("🦜", add_bos=False)
    assert len(ids) > 1  # the emoji is not one token: its bytes are spread over several
    stream = StreamDecoder(tok)
    pieces = [stream.feed(i) for i in ids]
    assert "".join(pieces[:-1]).strip() == ""
    assert pieces[-1] == "🦜" and stream.flush() == ""
    # a cut-off emoji is flushed as replacement characters, as decode() does
    for i in ids[:-1]:
        stream.feed(i)
    assert stream.flush() == tok.decode(ids[:-1]).lstrip(" ")
    assert "\ufffd" in tok.decode(ids[:-1])


def test_stream_holds_a_byte_fallback_run_until_it_ends(cases: dict[str, Case]) -> None:
    """tokenizers' ByteFallback decoder turns a whole run of byte tokens into U+FFFDs when any
    byte in it is bad, so exact streaming must wait for the run to end."""
    tok = cases["json-llama2-legacy"].ours
    ids = tok.encode("🦜 ok", add_bos=False)
    stream = StreamDecoder(tok)
    pieces = [stream.feed(i) for i in ids]
    is_byte = [tok.token_text(i).startswith("<0x") for i in ids]
    start = is_byte.index(True)
    end = is_byte.index(False, start)  # the first token after the run
    assert pieces[start:end] == [""] * (end - start) and pieces[end].startswith("🦜")
    assert "".join(pieces) + stream.flush() == tok.decode(ids) == "🦜 ok"


@pytest.mark.parametrize("name", ALL)
def test_token_bytes_concatenate_to_the_text(cases: dict[str, Case], name: str) -> None:
    tok = cases[name].ours
    for text in fx.CORPUS:
        ids = tok.encode(text, add_bos=False, parse_special=False)
        raw = b"".join(tok.token_bytes(i) for i in ids)
        if name == "gguf-llama" and text:
            assert raw == b" " + text.encode()  # the dummy-prefix space
        elif name.startswith(("gguf-gpt2", "json-llama3", "json-qwen2")):
            assert raw == text.encode()


def test_token_text_and_bytes_of_single_tokens(cases: dict[str, Case]) -> None:
    sp = cases["gguf-llama"].ours
    byte_id = sp.encode("\x00", add_bos=False)[-1]
    assert sp.token_text(byte_id) == "<0x00>" and sp.token_bytes(byte_id) == b"\x00"
    hello = sp.encode("Hello", add_bos=False)
    assert sp.token_text(hello[0]).startswith("\u2581")
    bl = cases["gguf-gpt2-llama-bpe"].ours
    space_id = bl.encode(" the", add_bos=False)[0]
    assert bl.token_text(space_id).startswith("\u0120") and bl.token_bytes(space_id)[:1] == b" "
    with pytest.raises(IndexError):
        bl.token_bytes(bl.vocab_size)


def test_special_token_attributes(cases: dict[str, Case]) -> None:
    sp = cases["gguf-llama"].ours
    assert (sp.bos_id, sp.eos_id, sp.add_bos) == (1, 2, True)
    assert sp.eot_ids == {2} and sp.encode("hi")[0] == 1
    l3 = cases["gguf-gpt2-llama-bpe"].ours
    assert l3.add_bos and l3.token_text(l3.bos_id) == "<|begin_of_text|>"
    names = {l3.token_text(i) for i in l3.eot_ids}
    assert names == {"<|eot_id|>", "<|end_of_text|>"}
    q2 = cases["json-qwen2"].ours
    assert not q2.add_bos and q2.bos_id is None
    assert {q2.token_text(i) for i in q2.eot_ids} == {"<|im_end|>", "<|endoftext|>"}
    j3 = cases["json-llama3"].ours
    assert j3.add_bos and j3.token_text(j3.bos_id) == "<|begin_of_text|>"
    assert j3.encode("hi", add_bos=False)[0] != j3.bos_id


def test_parse_special_false_keeps_user_defined_tokens(cases: dict[str, Case]) -> None:
    """Only special (control) tokens turn into text; user-defined ones still match, as in
    llama.cpp and `tokenizers`."""
    for name in ("gguf-llama", "gguf-gpt2-qwen2", "json-qwen2"):
        tok = cases[name].ours
        tool = tok.encode("<tool>", add_bos=False, parse_special=False)
        assert [tok.token_text(i) for i in tool][-1] == "<tool>"
    q2 = cases["json-qwen2"].ours
    assert len(q2.encode("<|im_end|>", parse_special=True)) == 1
    assert len(q2.encode("<|im_end|>", parse_special=False)) > 1


def test_config_files_beside_tokenizer_json(tmp_path: Path) -> None:
    ref = fx.train_byte_level("qwen2")
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    path = fx.save(ref, tmp_path, {"bos_token": None, "eos_token": {"content": "<|im_end|>"},
                                   "add_bos_token": False, "chat_template": template})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [
        ref.token_to_id("<|im_end|>"), ref.token_to_id("<|endoftext|>")]}))
    tok = tokenizer_from_json(path)
    assert tok.token_text(tok.eos_id) == "<|im_end|>" and tok.chat_template == template
    assert tok.eot_ids == {ref.token_to_id("<|im_end|>"), ref.token_to_id("<|endoftext|>")}
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": template}]
    fx.save(ref, tmp_path, {"chat_template": named})
    assert tokenizer_from_json(path).chat_template == template


def test_unicode_classes_match_oniguruma() -> None:
    """\\p{L}, \\p{N}, \\p{P} and \\s over a sample of every plane in use (and the code
    points assigned after Python's Unicode tables) split like `tokenizers` does."""
    from runtime.tokenizer import _compile

    sample = [*range(0, 0x3400, 3), *range(0x3400, 0x33000, 97), *range(0xE0000, 0xE0080),
              0x1C89, 0xA7CB, 0x105C0, 0x10D40, 0x116D0, 0x1B4E, 0x1E5FF, 0x31350, 0x2EBF0]
    text = "".join(chr(c) for c in sample if not 0xD800 <= c < 0xE000)
    for pattern in (r"\p{L}+", r"\p{N}", r"\p{P}+", r"\s+", r"[^\s\p{L}\p{N}]+", r"\P{L}+"):
        ref = pre_tokenizers.Split(Regex(pattern), behavior="isolated").pre_tokenize_str(text)
        ours = [m.group() for m in _compile(pattern).finditer(text)]
        assert [p for p, _ in ref if _compile(pattern).fullmatch(p)] == ours, pattern


# --------------------------------------------------------------------------------------------
# Bad input: each is a TokenizerError whose message names the key/file and the expectation.

def _sp_meta() -> dict[str, Any]:
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>",
                                                                      "\u2581a", "a"],
            "tokenizer.ggml.scores": [0.0, 0.0, 0.0, -1.0, -2.0],
            "tokenizer.ggml.token_type": [2, 3, 3, 1, 1]}


def _bpe_meta() -> dict[str, Any]:
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
            "tokenizer.ggml.tokens": ["a", "b", "ab", "<|im_end|>"],
            "tokenizer.ggml.token_type": [1, 1, 1, 3], "tokenizer.ggml.merges": ["a b"]}


@pytest.mark.parametrize(("change", "message"), [
    ({"tokenizer.ggml.model": "bert"}, r"tokenizer\.ggml\.model 'bert' is not supported"),
    ({"tokenizer.ggml.model": None}, r"tokenizer\.ggml\.model is missing"),
    ({"tokenizer.ggml.tokens": []}, r"tokenizer\.ggml\.tokens is missing or empty"),
    ({"tokenizer.ggml.scores": [0.0, 1.0]}, r"tokenizer\.ggml\.scores: has 2 entries but "
                                             r"tokenizer\.ggml\.tokens has 5"),
    ({"tokenizer.ggml.token_type": [1]}, r"tokenizer\.ggml\.token_type: has 1 entries"),
    ({"tokenizer.ggml.scores": "oops"}, r"tokenizer\.ggml\.scores: expected an array"),
    ({"tokenizer.ggml.bos_token_id": 99}, r"bos_token_id: token id 99 is outside"),
])
def test_bad_gguf_llama_metadata(change: dict[str, Any], message: str) -> None:
    meta = {k: v for k, v in {**_sp_meta(), **change}.items() if v is not None}
    with pytest.raises(TokenizerError, match=message):
        tokenizer_from_gguf(meta)


@pytest.mark.parametrize(("change", "message"), [
    ({"tokenizer.ggml.merges": None}, r"tokenizer\.ggml\.merges is missing: a 'gpt2'"),
    ({"tokenizer.ggml.merges": ["ab"]}, r"merges\[0\] = 'ab': expected 'left right'"),
    ({"tokenizer.ggml.merges": ["a c"]}, r"merge #0 'a' \+ 'c' needs token 'c'"),
    ({"tokenizer.ggml.pre": "klingon"}, r"tokenizer\.ggml\.pre 'klingon' is not supported"),
])
def test_bad_gguf_gpt2_metadata(change: dict[str, Any], message: str) -> None:
    meta = {k: v for k, v in {**_bpe_meta(), **change}.items() if v is not None}
    with pytest.raises(TokenizerError, match=message):
        tokenizer_from_gguf(meta)


def test_minimal_gguf_metadata_work() -> None:
    bpe = tokenizer_from_gguf(_bpe_meta())
    assert bpe.encode("ab<|im_end|>") == [2, 3] and bpe.decode([2, 3]) == "ab<|im_end|>"
    assert bpe.decode([2, 3], skip_special=True) == "ab"
    sp = tokenizer_from_gguf(_sp_meta())
    assert sp.encode("a") == [1, 3] and sp.decode([1, 3], skip_special=True) == "a"
    assert sp.decode([1, 3]) == "<s> a"  # a printed control token is text: "▁" is a space


def _json_doc() -> dict[str, Any]:
    return {"version": "1.0", "added_tokens": [], "normalizer": None, "pre_tokenizer": None,
            "post_processor": None, "decoder": {"type": "ByteLevel"},
            "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]}}


@pytest.mark.parametrize(("change", "message"), [
    ({"model": {"type": "Unigram", "vocab": []}}, r"model\.type: model 'Unigram' is not "
                                                  r"supported: expected 'BPE'"),
    ({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}},
     r"merge #0 'a' \+ 'b' needs token 'b'"),
    ({"model": {"type": "BPE", "vocab": ["a"], "merges": []}}, r"model\.vocab: expected"),
    ({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [1]}}, r"model\.merges\[0\]"),
    ({"model": {"type": "BPE", "vocab": {}, "merges": [], "dropout": 0.1}}, r"dropout"),
    ({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [], "unk_token": "<unk>"}},
     r"model\.unk_token: '<unk>' is not in model\.vocab"),
    ({"normalizer": {"type": "Precompiled", "precompiled_charsmap": ""}},
     r"normalizer: normalizer 'Precompiled' is not supported"),
    ({"pre_tokenizer": {"type": "BertPreTokenizer"}},
     r"pre_tokenizer: pre-tokenizer 'BertPreTokenizer' is not supported"),
    ({"decoder": {"type": "Sequence", "decoders": [{"type": "WordPiece"}]}},
     r"decoder\.decoders\[0\]: decoder 'WordPiece' is not supported"),
    ({"post_processor": {"type": "BertProcessing"}}, r"post-processor 'BertProcessing'"),
    ({"pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[[:alpha:]&&[^a]]"},
                        "behavior": "Isolated"}}, r"regex .* not supported"),
    ({"added_tokens": [{"content": "x"}]}, r"added_tokens\[0\]: expected 'id'"),
])
def test_bad_tokenizer_json(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({**_json_doc(), **change}))
    with pytest.raises(TokenizerError, match=message) as info:
        tokenizer_from_json(path)
    assert str(path) in str(info.value)


def test_malformed_or_missing_tokenizer_json(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": {"type": "BPE", ')
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not valid JSON"):
        tokenizer_from_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(TokenizerError, match=r"top level: expected an object"):
        tokenizer_from_json(path)
    with pytest.raises(TokenizerError, match=r"missing\.json: cannot read"):
        tokenizer_from_json(tmp_path / "missing.json")
    path.write_text(json.dumps(_json_doc()))
    (tmp_path / "tokenizer_config.json").write_text("{nope")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: not valid JSON"):
        tokenizer_from_json(path)
