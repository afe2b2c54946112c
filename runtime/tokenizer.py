"""Tokenizers for the runtime, in pure Python (stdlib `re` only).

Two families cover the llama-family models the runtime loads:

* `SentencePieceTokenizer` - GGUF ``tokenizer.ggml.model = "llama"``: score-driven BPE over
  characters with ``<0xXX>`` byte fallback and a dummy-prefix space, encoding exactly like
  `sentencepiece` (BPE model, identity normalization, no extra-whitespace removal).
* `HFTokenizer` - the Hugging Face `tokenizers` pipeline (added tokens, normalizer, pre-tokenizer,
  rank-driven BPE, decoder chain) for tokenizer.json files, both byte-level (GPT-2, Llama 3,
  Qwen2, SmolLM) and Llama-2 style with byte fallback; GGUF ``"gpt2"`` vocabularies are mapped
  onto the same pipeline with llama.cpp's pre-tokenizer regexes.

Decoding is one incremental state machine per tokenizer (`StreamDecoder`); `Tokenizer.decode`
runs that same machine, so streamed text always equals decoding everything at once.
"""

from __future__ import annotations

import codecs
import functools
import heapq
import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "HFTokenizer",
    "SentencePieceTokenizer",
    "StreamDecoder",
    "Tokenizer",
    "TokenizerError",
    "tokenizer_from_gguf",
    "tokenizer_from_json",
]

SPACE = "\u2581"  # SentencePiece's visible space, "▁"
UNK_SURFACE = " \u2047 "  # what sentencepiece prints for <unk>: " ⁇ "

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Texts llama.cpp treats as end-of-generation when they exist as special tokens.
EOT_TEXTS = frozenset({
    "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<|end_of_text|>", "<EOT>", "<end_of_utterance>",
})


class TokenizerError(ValueError):
    """A tokenizer that cannot be built: names the key or file and what was expected."""


# --------------------------------------------------------------------------------------------
# Unicode classes for the pre-tokenizer regexes (\p{L}, \p{N}, \p{P}, \s) without `regex`.

# Letters, numbers and punctuation assigned in Unicode 15.0-16.0: the Oniguruma engine inside
# `tokenizers` knows them, Python 3.11's unicodedata (14.0) does not.
_NEWER_UNICODE = {
    "L": "1C89-1C8A A7CB-A7CD A7DA-A7DC 105C0-105F3 10D4A-10D65 10D6F-10D85 10EC2-10EC4 "
         "1123F-11240 11380-11389 1138B 1138E 11390-113B5 113B7 113D1 113D3 11BC0-11BE0 11F02 "
         "11F04-11F10 11F12-11F33 1342F 13441-13446 13460-143FA 16100-1611D 16D40-16D6C 18CFF "
         "1B132 1B155 1DF25-1DF2A 1E030-1E06D 1E4D0-1E4EB 1E5D0-1E5ED 1E5F0 2B739 2EBF0-2EE5D "
         "31350-323AF",
    "N": "10D40-10D49 116D0-116E3 11BF0-11BF9 11F50-11F59 16130-16139 16D70-16D79 1CCF0-1CCF9 "
         "1D2C0-1D2D3 1E4F0-1E4F9 1E5F1-1E5FA",
    "P": "1B4E-1B4F 1B7F 10D6E 113D4-113D5 113D7-113D8 11B00-11B09 11BE1 11F43-11F4F "
         "16D6D-16D6F 1E5FF",
}
# Unicode White_Space: what \s means in Oniguruma and Rust (Python's \s adds U+001C-U+001F).
_WHITE_SPACE = ((0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680),
                (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F),
                (0x3000, 0x3000))

_JOIN_CONTROL = (0x200C, 0x200D)

Ranges = tuple[tuple[int, int], ...]


def _merge_ranges(ranges: Iterable[tuple[int, int]]) -> Ranges:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


@functools.cache
def _all_categories() -> dict[str, Ranges]:
    """General category -> code point ranges, from one pass over unicodedata (~0.2 s, once)."""
    found: dict[str, list[tuple[int, int]]] = {}
    start, current = 0, unicodedata.category("\0")
    for cp in range(1, 0x110001):
        cat = unicodedata.category(chr(cp)) if cp < 0x110000 else ""
        if cat != current:
            found.setdefault(current, []).append((start, cp - 1))
            start, current = cp, cat
    return {cat: tuple(r) for cat, r in found.items()}


@functools.cache
def _category_ranges(name: str) -> Ranges:
    """Ranges of a general category ("L", "Lu", "N", ...) as `tokenizers` sees it."""
    name = {"Letter": "L", "Number": "N", "Punctuation": "P", "Mark": "M", "Symbol": "S",
            "Separator": "Z", "Other": "C"}.get(name, name)
    cats = _all_categories()
    picked = [r for cat, ranges in cats.items() if cat.startswith(name) for r in ranges]
    if not picked or len(name) > 2:
        raise TokenizerError(f"regex: Unicode property \\p{{{name}}} is not supported")
    for item in _NEWER_UNICODE.get(name, "").split():
        lo, _, hi = item.partition("-")
        picked.append((int(lo, 16), int(hi or lo, 16)))
    return _merge_ranges(picked)


def _complement(ranges: Ranges) -> Ranges:
    out, nxt = [], 0
    for lo, hi in ranges:
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= 0x10FFFF:
        out.append((nxt, 0x10FFFF))
    return tuple(out)


def _class_body(ranges: Ranges) -> str:
    def esc(cp: int) -> str:
        return f"\\U{cp:08x}"
    return "".join(esc(lo) if lo == hi else f"{esc(lo)}-{esc(hi)}" for lo, hi in ranges)


def _escape_ranges(letter: str) -> Ranges:
    """Ranges of the Oniguruma shorthand classes we translate explicitly."""
    if letter in "sS":
        return _WHITE_SPACE
    if letter in "wW":  # close to Oniguruma's \w (which adds the other Alphabetic symbols)
        return _merge_ranges([*_category_ranges("L"), *_category_ranges("M"),
                              *_category_ranges("N"), *_category_ranges("Pc"), _JOIN_CONTROL])
    return _category_ranges("Nd")  # \d


@functools.cache
def _compile(pattern: str) -> re.Pattern[str]:
    """Translate an Oniguruma regex from tokenizer.json / llama.cpp into Python `re`.

    Unicode properties and shorthand classes become explicit ranges (inside a [...] class a
    negated one becomes its complement); \\z/\\Z and the line anchors ^/$ get Oniguruma's
    meaning. Nested or intersected classes are refused.
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    class_start = -1  # index in `pattern` of the "[" of the class we are in, or -1

    def emit(ranges: Ranges, negate: bool) -> None:
        if class_start >= 0:
            out.append(_class_body(_complement(ranges) if negate else ranges))
        else:
            out.append(f"[{'^' if negate else ''}{_class_body(ranges)}]")

    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            nxt = pattern[i + 1]
            i += 2
            if nxt in "pP":
                if pattern.startswith("{", i):
                    end = pattern.find("}", i)
                    if end < 0:
                        raise TokenizerError(f"regex {pattern!r}: unterminated \\p{{")
                    name, i = pattern[i + 1:end], end + 1
                else:
                    name, i = pattern[i:i + 1], i + 1
                negate = (nxt == "P") != name.startswith("^")
                emit(_category_ranges(name.lstrip("^")), negate)
            elif nxt in "sSwWdD":
                emit(_escape_ranges(nxt), nxt.isupper())
            elif nxt in "zZ" and class_start < 0:
                out.append(r"\Z" if nxt == "z" else r"(?=\n?\Z)")
            else:
                out.append("\\" + nxt)
            continue
        if class_start >= 0:
            # "]" right after "[" or "[^" is a literal, as in both engines
            first = i == class_start + 1 or (i == class_start + 2 and pattern[i - 1] == "^")
            if c == "]" and not first:
                class_start = -1
                out.append(c)
            elif c == "[" or pattern.startswith("&&", i):
                raise TokenizerError(f"regex {pattern!r}: nested or intersected character "
                                     "classes are not supported")
            else:
                out.append("\\" + c if c in "&~|" else c)  # keep Python from seeing set ops
        elif c == "[":
            class_start = i
            out.append(c)
        elif c in "^$":  # Oniguruma (Ruby syntax) anchors match at every line
            out.append(f"(?m:{c})")
        else:
            out.append(c)
        i += 1
    try:
        return re.compile("".join(out))
    except re.error as exc:
        raise TokenizerError(f"regex {pattern!r} is not supported: {exc}") from None


# --------------------------------------------------------------------------------------------
# Byte-level alphabet (GPT-2): every byte maps to a printable character.

@functools.cache
def _byte_to_char() -> tuple[str, ...]:
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


@functools.cache
def _char_to_byte() -> dict[str, int]:
    return {c: b for b, c in enumerate(_byte_to_char())}


def _to_byte_level(text: str) -> str:
    table = _byte_to_char()
    return "".join(table[b] for b in text.encode())


def _from_byte_level(token: str) -> bytes:
    """Bytes of a byte-level token; a token with characters outside the alphabet is raw UTF-8."""
    table = _char_to_byte()
    try:
        return bytes(table[c] for c in token)
    except KeyError:
        return token.encode()


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_token_value(token: str) -> int | None:
    m = _BYTE_TOKEN.fullmatch(token)
    return int(m.group(1), 16) if m else None


# --------------------------------------------------------------------------------------------
# UTF-8 assembly for decoding.

def _bytewise_replace(exc: UnicodeError) -> tuple[str, int]:
    """sentencepiece's rule: one U+FFFD per invalid byte, then resume at the next byte."""
    assert isinstance(exc, UnicodeDecodeError)
    return "\ufffd", exc.start + 1


codecs.register_error("runtime.tokenizer.bytewise", _bytewise_replace)


def _utf8_decoder(errors: str) -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")(errors)


# --------------------------------------------------------------------------------------------
# Added (special) tokens.

@dataclass(frozen=True)
class AddedToken:
    """A token matched whole in the input before the model sees it (HF added token)."""

    id: int
    content: str
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool = False


_WS_CHARS = frozenset(chr(c) for lo, hi in _WHITE_SPACE for c in range(lo, hi + 1))


class _AddedMatcher:
    """Leftmost-longest matching of added tokens, with HF's lstrip/rstrip/single_word rules."""

    def __init__(self, tokens: Sequence[AddedToken]):
        self.by_content = {t.content: t for t in tokens if t.content}
        ordered = sorted(self.by_content, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def split(self, text: str, offset: int = 0) -> list[tuple[str, int] | AddedToken]:
        """Text pieces as (text, original offset) and matched tokens, in order."""
        if self.pattern is None or not text:
            return [(text, offset)] if text else []
        out: list[tuple[str, int] | AddedToken] = []
        pos = search = 0
        while (m := self.pattern.search(text, search)) is not None:
            tok = self.by_content[m.group()]
            start, stop = m.start(), m.end()
            if tok.single_word and (_ends_with_word(text[:start]) or
                                    _starts_with_word(text[stop:])):
                search = m.end()  # tokenizers moves past a discarded match
                continue
            while tok.lstrip and start > pos and text[start - 1] in _WS_CHARS:
                start -= 1  # lstrip: the token takes the whitespace before it...
            while tok.rstrip and stop < len(text) and text[stop] in _WS_CHARS:
                stop += 1  # ...and rstrip the whitespace after it
            if start > pos:
                out.append((text[pos:start], offset + pos))
            out.append(tok)
            pos = search = stop
        if pos < len(text):
            out.append((text[pos:], offset + pos))
        return out


@functools.cache
def _rust_word() -> re.Pattern[str]:
    """\\w of Rust's regex crate, which `tokenizers` uses for single_word added tokens."""
    ranges = [r for cat in ("L", "M", "Nd", "Nl", "Pc") for r in _category_ranges(cat)]
    return re.compile(f"[{_class_body(_merge_ranges([*ranges, _JOIN_CONTROL]))}]")


def _is_word_char(c: str) -> bool:
    return bool(_rust_word().match(c))


def _ends_with_word(text: str) -> bool:
    return bool(text) and _is_word_char(text[-1])


def _starts_with_word(text: str) -> bool:
    return bool(text) and _is_word_char(text[0])


# --------------------------------------------------------------------------------------------
# Public base class and streaming.

class _TextStream:
    """Incremental decoder state: token ids in, finished text out."""

    def feed(self, token_id: int) -> str:
        raise NotImplementedError

    def flush(self) -> str:
        raise NotImplementedError


class Tokenizer:
    """A tokenizer of the runtime: text <-> token ids, plus the ids that end a turn."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    eot_ids: frozenset[int]
    add_bos: bool
    add_eos: bool
    chat_template: str | None

    def __init__(self, tokens: Sequence[str], added: Sequence[AddedToken], *,
                 bos_id: int | None, eos_id: int | None, add_bos: bool, add_eos: bool = False,
                 extra_eot_ids: Iterable[int] = (), chat_template: str | None = None):
        self._tokens = list(tokens)
        self.vocab_size = len(self._tokens)
        self._added = {t.id: t for t in added}
        self._special_ids = frozenset(t.id for t in added if t.special)
        self._matcher = _AddedMatcher([t for t in added if not t.normalized])
        self._matcher_plain = _AddedMatcher([t for t in added
                                             if not t.normalized and not t.special])
        for name, tid in (("bos", bos_id), ("eos", eos_id)):
            if tid is not None and not 0 <= tid < self.vocab_size:
                raise TokenizerError(f"{name} token id {tid} is outside the vocabulary "
                                     f"(size {self.vocab_size})")
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos, self.add_eos = add_bos, add_eos
        self.chat_template = chat_template
        eot = {t for t in extra_eot_ids if 0 <= t < self.vocab_size}
        eot |= {t.id for t in added if t.special and t.content in EOT_TEXTS}
        if eos_id is not None:
            eot.add(eos_id)
        self.eot_ids = frozenset(eot)

    # -- encoding ----------------------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool | None = None,
               parse_special: bool = True) -> list[int]:
        """Token ids of `text`.

        `add_bos=None` uses the model's default (`self.add_bos`, and `self.add_eos` for a
        trailing EOS); `False` adds no BOS/EOS at all. With `parse_special=False`, special
        (control) tokens written in the text are tokenized as plain text; non-special added
        (user-defined) tokens still match, as in llama.cpp and `tokenizers`.
        """
        matcher = self._matcher if parse_special else self._matcher_plain
        ids: list[int] = []
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.append(self.bos_id)
        for piece in matcher.split(text):
            if isinstance(piece, AddedToken):
                ids.append(piece.id)
            else:
                ids.extend(self._encode_text(piece[0], piece[1], parse_special))
        if self.add_eos and add_bos is not False and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def _encode_text(self, text: str, offset: int, parse_special: bool) -> list[int]:
        raise NotImplementedError

    # -- decoding ----------------------------------------------------------------------------
    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of `ids`; `skip_special` drops control/special tokens."""
        stream = self._stream(skip_special)
        return "".join([*(stream.feed(int(i)) for i in ids), stream.flush()])

    def _stream(self, skip_special: bool) -> _TextStream:
        raise NotImplementedError

    def token_text(self, token_id: int) -> str:
        """The vocabulary string of one token (as stored: "▁" / byte-level characters)."""
        self._check_id(token_id)
        return self._tokens[token_id]

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (byte fallback and byte-level decoded)."""
        raise NotImplementedError

    def is_special(self, token_id: int) -> bool:
        """Whether the token is a control/special token (dropped by skip_special)."""
        return token_id in self._special_ids

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(f"token id {token_id} outside the vocabulary "
                             f"(size {self.vocab_size})")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, add_bos={self.add_bos})")


class StreamDecoder:
    """Incremental detokenizer for streaming.

    `feed` returns only text that can no longer change (it holds back incomplete UTF-8 and
    pending byte-fallback runs); `flush` returns the rest. The concatenation of everything
    returned always equals `tokenizer.decode(all_ids, skip_special=...)`.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._stream = tokenizer._stream(skip_special)

    def feed(self, token_id: int) -> str:
        return self._stream.feed(int(token_id))

    def flush(self) -> str:
        """Return what is held back and start over for a new sequence."""
        text = self._stream.flush()
        self._stream = self.tokenizer._stream(self.skip_special)
        return text


# --------------------------------------------------------------------------------------------
# SentencePiece-style BPE (GGUF "llama").

class _SpmModel:
    """sentencepiece's BPE encoder: merge the adjacent pair whose concatenation is the
    highest-scoring piece (leftmost on ties); user-defined pieces are never merged."""

    def __init__(self, pieces: dict[str, int], scores: Sequence[float], unused: frozenset[int],
                 user_defined: Sequence[str]):
        self.pieces, self.scores, self.unused = pieces, scores, unused
        ordered = sorted((u for u in user_defined if u), key=len, reverse=True)
        self.user_re = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def _symbols(self, text: str) -> tuple[list[str], list[bool]]:
        syms: list[str] = []
        frozen: list[bool] = []
        pos = 0
        for m in self.user_re.finditer(text) if self.user_re else ():
            syms.extend(text[pos:m.start()])
            frozen.extend([False] * (m.start() - pos))
            syms.append(m.group())
            frozen.append(True)
            pos = m.end()
        syms.extend(text[pos:])
        frozen.extend([False] * (len(text) - pos))
        return syms, frozen

    def encode(self, text: str) -> list[tuple[str, int | None]]:
        """(piece, id or None when the piece is not in the vocabulary)."""
        syms, frozen = self._symbols(text)
        n = len(syms)
        prev = list(range(-1, n - 1))
        nxt = [*range(1, n), -1]
        heap: list[tuple[float, int, int, int]] = []
        rev_merge: dict[str, tuple[str, str]] = {}

        def add_pair(left: int, right: int) -> None:
            if left < 0 or right < 0 or frozen[left] or frozen[right]:
                return
            piece = syms[left] + syms[right]
            pid = self.pieces.get(piece)
            if pid is None:
                return
            heapq.heappush(heap, (-self.scores[pid], left, right, len(piece)))
            if pid in self.unused:
                rev_merge[piece] = (syms[left], syms[right])

        for i in range(1, n):
            add_pair(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            if not syms[left] or not syms[right] or len(syms[left]) + len(syms[right]) != size:
                continue  # stale: one side was merged away or grew
            syms[left] += syms[right]
            syms[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add_pair(prev[left], left)
            add_pair(left, nxt[left])

        out: list[tuple[str, int | None]] = []

        def resegment(piece: str) -> None:
            pid = self.pieces.get(piece)
            if pid is not None and pid in self.unused and piece in rev_merge:
                a, b = rev_merge[piece]
                resegment(a)
                resegment(b)
            else:
                out.append((piece, pid))

        i = 0 if n else -1
        while i >= 0:
            resegment(syms[i])
            i = nxt[i]
        return out


class SentencePieceTokenizer(Tokenizer):
    """GGUF "llama" vocabularies: sentencepiece BPE with byte fallback and a dummy prefix.

    Text is cut at control tokens (with `parse_special`); each piece of text gets the dummy
    prefix space like a separate `sentencepiece` call (llama.cpp does the same).
    User-defined tokens are matched inside the text and never merged, like sentencepiece.
    """

    def __init__(self, tokens: Sequence[str], scores: Sequence[float], types: Sequence[int], *,
                 bos_id: int | None, eos_id: int | None, unk_id: int | None, add_bos: bool,
                 add_eos: bool = False, add_space_prefix: bool = True,
                 extra_eot_ids: Iterable[int] = (), chat_template: str | None = None):
        added = [AddedToken(i, t, special=True) for i, (t, ty) in enumerate(zip(tokens, types,
                                                                                strict=True))
                 if ty in (CONTROL, UNKNOWN)]
        super().__init__(tokens, added, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos,
                         add_eos=add_eos, extra_eot_ids=extra_eot_ids,
                         chat_template=chat_template)
        self._types = list(types)
        self.add_space_prefix = add_space_prefix
        pieces: dict[str, int] = {}
        self._byte_ids: dict[int, int] = {}
        self._byte_of: dict[int, int] = {}
        for i, (tok, ty) in enumerate(zip(tokens, types, strict=True)):
            if ty in (NORMAL, USER_DEFINED, UNUSED):
                pieces.setdefault(tok, i)
            elif ty == BYTE and (b := _byte_token_value(tok)) is not None:
                self._byte_ids.setdefault(b, i)
                self._byte_of[i] = b
        self.unk_id = unk_id
        self._model = _SpmModel(
            pieces, scores, frozenset(i for i, ty in enumerate(types) if ty == UNUSED),
            [t for t, ty in zip(tokens, types, strict=True) if ty == USER_DEFINED])

    def _encode_text(self, text: str, offset: int, parse_special: bool) -> list[int]:
        if self.add_space_prefix:
            text = " " + text
        ids: list[int] = []
        for piece, pid in self._model.encode(text.replace(" ", SPACE)):
            if pid is not None:
                ids.append(pid)
                continue
            raw = piece.encode()
            if all(b in self._byte_ids for b in raw):
                ids.extend(self._byte_ids[b] for b in raw)
            elif self.unk_id is not None:
                ids.append(self.unk_id)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        self._check_id(token_id)
        if token_id in self._byte_of:
            return bytes([self._byte_of[token_id]])
        return self._tokens[token_id].replace(SPACE, " ").encode()

    def _stream(self, skip_special: bool) -> _TextStream:
        return _SpmStream(self, skip_special)


class _SpmStream(_TextStream):
    """sentencepiece's decoder: byte runs decoded one character at a time (U+FFFD per bad
    byte), and one "▁" dropped from the first piece that starts the text."""

    def __init__(self, tok: SentencePieceTokenizer, skip_special: bool):
        self.tok, self.skip_special = tok, skip_special
        self.utf8 = _utf8_decoder("runtime.tokenizer.bytewise")
        self.any_text = self.bos_ws_seen = False
        self.is_bos_ws = True

    def _out(self, text: str) -> str:
        self.any_text = self.any_text or bool(text)
        return text

    def feed(self, token_id: int) -> str:
        tok = self.tok
        tok._check_id(token_id)
        if token_id in tok._byte_of:
            return self._out(self.utf8.decode(bytes([tok._byte_of[token_id]])))
        text = self._out(self.utf8.decode(b"", final=True))
        self.utf8.reset()
        if self.bos_ws_seen or self.any_text:
            self.is_bos_ws = False
        kind, piece = tok._types[token_id], tok._tokens[token_id]
        self.bos_ws_seen = False
        if kind == CONTROL:
            return text + self._out("" if self.skip_special else piece)
        if kind == UNKNOWN:
            return text + self._out(UNK_SURFACE)
        if self.is_bos_ws and tok.add_space_prefix and piece.startswith(SPACE):
            piece, self.bos_ws_seen = piece[1:], True
        return text + self._out(piece.replace(SPACE, " "))

    def flush(self) -> str:
        return self._out(self.utf8.decode(b"", final=True))


# --------------------------------------------------------------------------------------------
# The Hugging Face pipeline: BPE model, normalizers, pre-tokenizers, decoders.

class _BpeModel:
    """`tokenizers`' BPE: apply the lowest-ranked merge first (leftmost on ties)."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *,
                 unk_token: str | None = None, fuse_unk: bool = False,
                 byte_fallback: bool = False, ignore_merges: bool = False, where: str = "merges",
                 first_merge_wins: bool = False):
        self.vocab = vocab
        self.ranks: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (a, b) in enumerate(merges):
            for part in (a, b, a + b):
                if part not in vocab:
                    raise TokenizerError(f"{where}: merge #{rank} {a!r} + {b!r} needs token "
                                         f"{part!r}, which is not in the vocabulary")
            # A repeated merge: tokenizers keeps the last one, llama.cpp the first.
            pair = (vocab[a], vocab[b])
            if not (first_merge_wins and pair in self.ranks):
                self.ranks[pair] = (rank, vocab[a + b])
        self.unk_id = vocab.get(unk_token) if unk_token is not None else None
        self.fuse_unk, self.byte_fallback, self.ignore_merges = fuse_unk, byte_fallback, \
            ignore_merges
        self.byte_ids = {b: vocab[f"<0x{b:02X}>"] for b in range(256) if f"<0x{b:02X}>" in vocab}
        self._cache: dict[str, list[int]] = {}

    def encode(self, word: str) -> list[int]:
        hit = self._cache.get(word)
        if hit is None:
            hit = self._encode(word)
            if len(word) <= 256:  # only words that recur; a long one is a whole document
                if len(self._cache) > 50_000:
                    self._cache.clear()
                self._cache[word] = hit
        return hit

    def _encode(self, word: str) -> list[int]:
        if self.ignore_merges and (tid := self.vocab.get(word)) is not None:
            return [tid]
        ids: list[int] = []
        unk, pending_unk = self.unk_id, False
        for ch in word:
            tid = self.vocab.get(ch)
            if tid is not None:
                if pending_unk and unk is not None:
                    ids.append(unk)
                pending_unk = False
                ids.append(tid)
                continue
            raw = ch.encode()
            if self.byte_fallback and all(b in self.byte_ids for b in raw):
                # tokenizers emits a pending <unk> only at the next known character
                ids.extend(self.byte_ids[b] for b in raw)
                continue
            if unk is not None:
                if pending_unk and not self.fuse_unk:
                    ids.append(unk)
                pending_unk = True
        if pending_unk and unk is not None:
            ids.append(unk)
        return self._merge(ids)

    def _merge(self, ids: list[int]) -> list[int]:
        n, ranks = len(ids), self.ranks
        if n < 2:
            return ids
        prev = list(range(-1, n - 1))
        nxt = [*range(1, n), -1]
        alive = [True] * n
        heap = [(m[0], i, m[1]) for i in range(n - 1)
                if (m := ranks.get((ids[i], ids[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            _, i, new_id = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j < 0:
                continue
            m = ranks.get((ids[i], ids[j]))
            if m is None or m[1] != new_id:
                continue  # stale entry
            ids[i], alive[j] = new_id, False
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prev[nxt[j]] = i
            if prev[i] >= 0 and (m := ranks.get((ids[prev[i]], ids[i]))) is not None:
                heapq.heappush(heap, (m[0], prev[i], m[1]))
            if nxt[i] >= 0 and (m := ranks.get((ids[i], ids[nxt[i]]))) is not None:
                heapq.heappush(heap, (m[0], i, m[1]))
        return [t for t, a in zip(ids, alive, strict=True) if a]


# A piece of text during pre-tokenization, and whether it starts at the input's offset 0
# (Metaspace's prepend_scheme "first" needs that).
Piece = tuple[str, bool]
Normalizer = Callable[[str], str]
PreTokenizer = Callable[[list[Piece]], list[Piece]]

_SPLIT_BEHAVIORS = {"removed", "isolated", "mergedwithprevious", "mergedwithnext", "contiguous"}


def _split_pieces(pieces: list[Piece], find: Callable[[str], Iterable[tuple[int, int]]],
                  behavior: str, invert: bool = False) -> list[Piece]:
    """`tokenizers`' SplitDelimiterBehavior on every piece; `find` yields match spans."""
    out: list[Piece] = []
    for text, first in pieces:
        spans: list[tuple[int, int, bool]] = []
        pos = 0
        for start, end in find(text):
            if start == end:
                continue
            if start > pos:
                spans.append((pos, start, invert))
            spans.append((start, end, not invert))
            pos = end
        if pos < len(text):
            spans.append((pos, len(text), invert))
        parts: list[list[int]] = []  # [start, end]
        prev_match = False
        for start, end, is_match in spans:
            if behavior == "removed" and is_match:
                continue
            glue = parts and (
                (behavior == "mergedwithprevious" and is_match and not prev_match)
                or (behavior == "mergedwithnext" and not is_match and prev_match)
                or (behavior == "contiguous" and is_match == prev_match))
            if glue:
                parts[-1][1] = end
            else:
                parts.append([start, end])
            prev_match = is_match
        out.extend((text[s:e], first and s == 0) for s, e in parts if e > s)
    return out


def _regex_finder(pattern: re.Pattern[str]) -> Callable[[str], Iterable[tuple[int, int]]]:
    return lambda text: (m.span() for m in pattern.finditer(text))


GPT2_PATTERN = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
                r"|\s+")
LLAMA3_PATTERN = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
                  r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                  r"|\s+(?!\S)|\s+")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")

# tokenizer.ggml.pre -> (split regexes applied in turn, ignore_merges), as llama.cpp does.
GGUF_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "default": ((r"[\p{P}\$\+<=>\^~\|]+", GPT2_PATTERN, r"\p{N}+", r"[0-9][0-9][0-9]"), False),
    **dict.fromkeys(("gpt2", "gpt-2", "phi-2", "olmo", "jais", "mpt"), ((GPT2_PATTERN,), False)),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral"),
                    ((LLAMA3_PATTERN,), True)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), ((QWEN2_PATTERN,), False)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"),
                    ((r"\p{N}", GPT2_PATTERN), False)),
}


def _byte_level_pre(add_prefix_space: bool, use_regex: bool) -> PreTokenizer:
    gpt2 = _compile(GPT2_PATTERN)

    def run(pieces: list[Piece]) -> list[Piece]:
        if add_prefix_space:
            pieces = [(t if t.startswith(" ") else " " + t, f) for t, f in pieces]
        if use_regex:
            pieces = _split_pieces(pieces, _regex_finder(gpt2), "isolated")
        return [(_to_byte_level(t), f) for t, f in pieces]
    return run


def _metaspace_pre(replacement: str, scheme: str, split: bool) -> PreTokenizer:
    def run(pieces: list[Piece]) -> list[Piece]:
        out: list[Piece] = []
        for text, first in pieces:
            text = text.replace(" ", replacement)
            if (scheme == "always" or (scheme == "first" and first)) and \
                    not text.startswith(replacement):
                text = replacement + text
            out.append((text, first))
        if split:
            out = _split_pieces(out, lambda t: ((i, i + 1) for i, c in enumerate(t)
                                                if c == replacement), "mergedwithnext")
        return out
    return run


class _Chain:
    """Decoder stages in the shape of `tokenizers`' decoders, run as a stream.

    Each stage takes fragments ``(text, starts_token)`` and yields fragments: before a fusing
    decoder (Fuse, ByteLevel) every fragment is a whole token; after it, fragments are pieces
    of one growing token, so per-token rules (Strip, Metaspace) still apply exactly.
    """

    def __init__(self, stages: list[Callable[[], _Stage]]):
        self.factories = stages

    def stream(self) -> list[_Stage]:
        return [make() for make in self.factories]


class _Stage:
    def push(self, frag: str, new: bool) -> list[tuple[str, bool]]:
        raise NotImplementedError

    def finish(self) -> list[tuple[str, bool]]:
        return []


class _ReplaceStage(_Stage):
    def __init__(self, old: str | re.Pattern[str], content: str):
        self.old, self.content = old, content

    def push(self, frag: str, new: bool) -> list[tuple[str, bool]]:
        if isinstance(self.old, str):
            return [(frag.replace(self.old, self.content), new)]
        return [(self.old.sub(lambda _m: self.content, frag), new)]


class _ByteFallbackStage(_Stage):
    """Runs of <0xXX> tokens become their UTF-8 text, or one U+FFFD per byte if invalid."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def _drain(self) -> list[tuple[str, bool]]:
        if not self.buf:
            return []
        try:
            out = [(bytes(self.buf).decode("utf-8"), True)]
        except UnicodeDecodeError:
            out = [("\ufffd", True)] * len(self.buf)
        self.buf.clear()
        return out

    def push(self, frag: str, new: bool) -> list[tuple[str, bool]]:
        b = _byte_token_value(frag)
        if b is not None:
            self.buf.append(b)
            return []
        return [*self._drain(), (frag, new)]

    def finish(self) -> list[tuple[str, bool]]:
        return self._drain()


class _FuseStage(_Stage):
    def __init__(self) -> None:
        self.started = False

    def push(self, frag: str, new: bool) -> list[tuple[str, bool]]:
        first = not self.started
        self.started = True
        return [(frag, first)]


class _StripStage(_Stage):
    """Strip up to `start` leading and `stop` trailing `content` chars of every token."""

    def __init__(self, content: str, start: int, stop: int):
        self.content, self.start, self.stop = content, start, stop
        self.left = 0
        self.held = ""

    def push(self, frag: str, new: bool) -> list[tuple[str, bool]]:
        if new:
            self.left, self.held = self.start, ""  # held trailing chars of the last token go
        i = 0
        while self.left and i < len(frag) and frag[i] == self.content:
            i, self.left = i + 1, self.left - 1
        if i < len(frag):
            self.left = 0
        frag = frag[i:]
        if self.stop:
            frag = self.held + frag
            run = len(frag) - len(frag.rstrip(self.content))
            keep = len(frag) - min(run, self.stop)
            frag, self.held = frag[:keep], frag[keep:]
        return [(frag, new)]


class _MetaspaceStage(_Stage):
    """"▁" -> " ", except that the first token loses all of its "▁" (prepend schemes)."""

    def __init__(self, replacement: str, prepend: bool):
        self.replacement, self.prepend = replacement, prepend
        self.index = -1

    def push(self, frag: str, new: bool) -> list[tuple[str, bool]]:
        self.index += new
        if self.index <= 0 and self.prepend:
            return [(frag.replace(self.replacement, ""), new)]
        return [(frag.replace(self.replacement, " "), new)]


class _ByteLevelStage(_Stage):
    """Byte-level characters back to bytes, then lossy UTF-8 over the whole output."""

    def __init__(self) -> None:
        self.utf8 = _utf8_decoder("replace")
        self.started = False

    def _emit(self, text: str) -> list[tuple[str, bool]]:
        if not text:
            return []
        first = not self.started
        self.started = True
        return [(text, first)]

    def push(self, frag: str, new: bool) -> list[tuple[str, bool]]:
        return self._emit(self.utf8.decode(_from_byte_level(frag)))

    def finish(self) -> list[tuple[str, bool]]:
        return self._emit(self.utf8.decode(b"", final=True))


class _JoinStage(_Stage):
    """No decoder at all: `tokenizers` joins the tokens with spaces."""

    def __init__(self) -> None:
        self.started = False

    def push(self, frag: str, new: bool) -> list[tuple[str, bool]]:
        sep = " " if self.started else ""
        self.started = True
        return [(sep + frag, new)]


class _ChainStream(_TextStream):
    def __init__(self, tok: HFTokenizer, skip_special: bool):
        self.tok, self.skip_special = tok, skip_special
        self.stages = tok._decoder.stream()

    def _run(self, frags: list[tuple[str, bool]], start: int) -> str:
        for stage in self.stages[start:]:
            frags = [o for f in frags for o in stage.push(*f)]
        return "".join(f for f, _ in frags)

    def feed(self, token_id: int) -> str:
        self.tok._check_id(token_id)
        if self.skip_special and token_id in self.tok._special_ids:
            return ""
        return self._run([(self.tok._dec_strings[token_id], True)], 0)

    def flush(self) -> str:
        out = []
        for k, stage in enumerate(self.stages):
            out.append(self._run(stage.finish(), k + 1))
        return "".join(out)


class HFTokenizer(Tokenizer):
    """The Hugging Face `tokenizers` pipeline: added tokens, normalizer, pre-tokenizer, BPE,
    decoder chain. Built from tokenizer.json, or from GGUF "gpt2" metadata."""

    def __init__(self, tokens: Sequence[str], added: Sequence[AddedToken], model: _BpeModel, *,
                 normalizers: Sequence[Normalizer] = (),
                 pre_tokenizers: Sequence[PreTokenizer] = (),
                 decoder: _Chain, byte_level: bool, byte_fallback: bool,
                 replacements: Sequence[tuple[str, str]] = (),
                 dec_strings: Sequence[str] | None = None,
                 bos_id: int | None, eos_id: int | None, add_bos: bool, add_eos: bool = False,
                 extra_eot_ids: Iterable[int] = (), chat_template: str | None = None):
        super().__init__(tokens, added, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos,
                         add_eos=add_eos, extra_eot_ids=extra_eot_ids,
                         chat_template=chat_template)
        self._model = model
        self._normalizers = list(normalizers)
        self._pre = list(pre_tokenizers)
        self._decoder = decoder
        self._byte_level, self._byte_fallback = byte_level, byte_fallback
        self._replacements = list(replacements)
        self._dec_strings = list(dec_strings) if dec_strings is not None else self._tokens
        norm_added = [t for t in added if t.normalized]
        self._norm_matcher = _AddedMatcher(norm_added)
        self._norm_matcher_plain = _AddedMatcher([t for t in norm_added if not t.special])

    def _encode_text(self, text: str, offset: int, parse_special: bool) -> list[int]:
        for norm in self._normalizers:
            text = norm(text)
        matcher = self._norm_matcher if parse_special else self._norm_matcher_plain
        ids: list[int] = []
        for piece in matcher.split(text):
            if isinstance(piece, AddedToken):
                ids.append(piece.id)
                continue
            pieces: list[Piece] = [(piece[0], offset == 0 and piece[1] == 0)]
            for pre in self._pre:
                pieces = pre(pieces)
            for word, _ in pieces:
                if word:
                    ids.extend(self._model.encode(word))
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        self._check_id(token_id)
        s = self._dec_strings[token_id]
        if self._byte_level:
            return _from_byte_level(s)
        if self._byte_fallback and (b := _byte_token_value(s)) is not None:
            return bytes([b])
        for old, new in self._replacements:
            s = s.replace(old, new)
        return s.encode()

    def _stream(self, skip_special: bool) -> _TextStream:
        return _ChainStream(self, skip_special)


# --------------------------------------------------------------------------------------------
# GGUF metadata.

def _gguf_list(meta: Mapping[str, Any], key: str, n: int | None = None) -> list[Any] | None:
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TokenizerError(f"GGUF {key}: expected an array, got {type(value).__name__}")
    items = list(value)
    if n is not None and len(items) != n:
        raise TokenizerError(f"GGUF {key}: has {len(items)} entries but tokenizer.ggml.tokens "
                             f"has {n}; they must match one to one")
    return items


def _gguf_int(meta: Mapping[str, Any], key: str, n: int) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    try:
        tid = int(value)
    except (TypeError, ValueError):
        raise TokenizerError(f"GGUF {key}: expected an integer token id, "
                             f"got {value!r}") from None
    if tid == -1 or tid == 0xFFFFFFFF:  # llama.cpp's "none"
        return None
    if not 0 <= tid < n:
        raise TokenizerError(f"GGUF {key}: token id {tid} is outside the vocabulary (size {n})")
    return tid


def _gguf_text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) \
        else str(value)


def tokenizer_from_gguf(meta: Mapping[str, Any]) -> Tokenizer:
    """Build the tokenizer that GGUF `tokenizer.ggml.*` metadata describes (llama.cpp's keys)."""
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        raise TokenizerError("GGUF tokenizer.ggml.model is missing: expected 'llama' or 'gpt2'")
    model = _gguf_text(model)
    if model not in ("llama", "gpt2"):
        raise TokenizerError(f"GGUF tokenizer.ggml.model {model!r} is not supported: expected "
                             "'llama' (SentencePiece) or 'gpt2' (byte-level BPE)")
    raw_tokens = _gguf_list(meta, "tokenizer.ggml.tokens")
    if not raw_tokens:
        raise TokenizerError("GGUF tokenizer.ggml.tokens is missing or empty: expected the "
                             "vocabulary as an array of strings")
    tokens = [_gguf_text(t) for t in raw_tokens]
    n = len(tokens)
    scores = [float(s) for s in _gguf_list(meta, "tokenizer.ggml.scores", n) or [0.0] * n]
    types = [int(t) for t in _gguf_list(meta, "tokenizer.ggml.token_type", n) or [NORMAL] * n]
    ids = {k: _gguf_int(meta, f"tokenizer.ggml.{k}_token_id", n)
           for k in ("bos", "eos", "eot", "eom", "unknown")}
    template = meta.get("tokenizer.chat_template")
    common: dict[str, Any] = {
        "add_eos": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "extra_eot_ids": [i for i in (ids["eot"], ids["eom"]) if i is not None]
        + [i for i, (t, ty) in enumerate(zip(tokens, types, strict=True))
           if ty == CONTROL and t in EOT_TEXTS],
        "chat_template": _gguf_text(template) if template is not None else None,
    }

    if model == "llama":
        def default(key: str, fallback: int) -> int | None:
            if f"tokenizer.ggml.{key}_token_id" in meta:
                return ids[key]
            return fallback if fallback < n else None
        return SentencePieceTokenizer(
            tokens, scores, types, bos_id=default("bos", 1), eos_id=default("eos", 2),
            unk_id=default("unknown", 0),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
            add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)), **common)

    merges_raw = _gguf_list(meta, "tokenizer.ggml.merges")
    if not merges_raw:
        raise TokenizerError("GGUF tokenizer.ggml.merges is missing: a 'gpt2' (byte-level BPE) "
                             "tokenizer needs its merges as an array of 'left right' strings")
    merges = []
    for k, m in enumerate(merges_raw):
        text = _gguf_text(m)
        cut = text.find(" ", 1)
        if cut < 0:
            raise TokenizerError(f"GGUF tokenizer.ggml.merges[{k}] = {text!r}: expected "
                                 "'left right'")
        merges.append((text[:cut], text[cut + 1:]))
    pre_name = _gguf_text(meta.get("tokenizer.ggml.pre", "default"))
    if pre_name not in GGUF_PRE_TOKENIZERS:
        raise TokenizerError(f"GGUF tokenizer.ggml.pre {pre_name!r} is not supported: expected "
                             f"one of {', '.join(sorted(GGUF_PRE_TOKENIZERS))}")
    patterns, ignore_merges = GGUF_PRE_TOKENIZERS[pre_name]
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = _BpeModel(vocab, merges, ignore_merges=ignore_merges, where="GGUF tokenizer.ggml.merges",
                    first_merge_wins=True)
    added = [AddedToken(i, t, special=ty != USER_DEFINED)
             for i, (t, ty) in enumerate(zip(tokens, types, strict=True))
             if ty in (CONTROL, UNKNOWN, USER_DEFINED)]
    pre = [_split_pre(_compile(p), "isolated") for p in patterns] + [_byte_level_pre(False, False)]
    # llama.cpp prints control and user-defined tokens as their raw text.
    dec = [_to_byte_level(t) if ty in (CONTROL, UNKNOWN, USER_DEFINED) else t
           for t, ty in zip(tokens, types, strict=True)]
    return HFTokenizer(
        tokens, added, bpe, pre_tokenizers=pre, decoder=_Chain([_ByteLevelStage]),
        byte_level=True, byte_fallback=False, dec_strings=dec, bos_id=ids["bos"],
        eos_id=ids["eos"], add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", ignore_merges)),
        **common)


def _split_pre(pattern: re.Pattern[str], behavior: str, invert: bool = False) -> PreTokenizer:
    finder = _regex_finder(pattern)
    return lambda pieces: _split_pieces(pieces, finder, behavior, invert)


# --------------------------------------------------------------------------------------------
# tokenizer.json.

class _JsonReader:
    """Reads one tokenizer.json section by section, naming the path in every error."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, what: str) -> TokenizerError:
        return TokenizerError(f"{self.path}: {where}: {what}")

    def obj(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected an object, got {type(value).__name__}")
        return value

    def kind(self, value: Any, where: str) -> str:
        node = self.obj(value, where)
        t = node.get("type")
        if not isinstance(t, str):
            raise self.fail(where, "expected a 'type' field")
        return t

    def regex(self, pattern: str, where: str) -> re.Pattern[str]:
        try:
            return _compile(pattern)
        except TokenizerError as exc:
            raise self.fail(where, str(exc)) from None

    def pattern(self, node: dict[str, Any], where: str) -> tuple[str, bool]:
        """(pattern, is_literal) of a {"String": ...} / {"Regex": ...} pattern."""
        pat = self.obj(node.get("pattern"), f"{where}.pattern")
        if isinstance(pat.get("String"), str):
            return pat["String"], True
        if isinstance(pat.get("Regex"), str):
            return pat["Regex"], False
        raise self.fail(f"{where}.pattern", "expected {'String': ...} or {'Regex': ...}")

    # -- normalizers -------------------------------------------------------------------------
    def normalizers(self, node: Any, where: str = "normalizer") -> list[Normalizer]:
        if node is None:
            return []
        t = self.kind(node, where)
        if t == "Sequence":
            items = node.get("normalizers")
            if not isinstance(items, list):
                raise self.fail(where, "Sequence needs a 'normalizers' list")
            return [n for k, item in enumerate(items)
                    for n in self.normalizers(item, f"{where}.normalizers[{k}]")]
        if t == "Prepend":
            prefix = str(node.get("prepend", ""))
            return [lambda s: prefix + s if s else s]
        if t == "Replace":
            pat, literal = self.pattern(node, where)
            content = str(node.get("content", ""))
            if literal:
                return [lambda s: s.replace(pat, content)]
            rx = self.regex(pat, where)
            return [lambda s: rx.sub(lambda _m: content, s)]
        if t in ("NFC", "NFD", "NFKC", "NFKD"):
            return [functools.partial(unicodedata.normalize, t)]
        if t == "Lowercase":
            return [str.lower]
        if t == "Strip":
            left, right = bool(node.get("strip_left", True)), bool(node.get("strip_right", True))
            ws = "".join(chr(c) for lo, hi in _WHITE_SPACE for c in range(lo, hi + 1))

            def strip(s: str) -> str:
                s = s.lstrip(ws) if left else s
                return s.rstrip(ws) if right else s
            return [strip]
        raise self.fail(where, f"normalizer {t!r} is not supported (supported: Sequence, "
                               "Prepend, Replace, NFC, NFD, NFKC, NFKD, Lowercase, Strip)")

    # -- pre-tokenizers ----------------------------------------------------------------------
    def pre_tokenizers(self, node: Any, where: str = "pre_tokenizer") -> list[PreTokenizer]:
        if node is None:
            return []
        t = self.kind(node, where)
        if t == "Sequence":
            items = node.get("pretokenizers")
            if not isinstance(items, list):
                raise self.fail(where, "Sequence needs a 'pretokenizers' list")
            return [p for k, item in enumerate(items)
                    for p in self.pre_tokenizers(item, f"{where}.pretokenizers[{k}]")]
        if t == "Split":
            pat, literal = self.pattern(node, where)
            behavior = str(node.get("behavior", "Isolated")).lower().replace("_", "")
            if behavior not in _SPLIT_BEHAVIORS:
                raise self.fail(where, f"Split behavior {node.get('behavior')!r} is unknown")
            rx = re.compile(re.escape(pat)) if literal else self.regex(pat, where)
            return [_split_pre(rx, behavior, bool(node.get("invert", False)))]
        if t == "ByteLevel":
            return [_byte_level_pre(bool(node.get("add_prefix_space", True)),
                                    bool(node.get("use_regex", True)))]
        if t == "Metaspace":
            replacement = str(node.get("replacement", node.get("str_rep", SPACE)))
            if len(replacement) != 1:
                raise self.fail(where, "Metaspace replacement must be one character")
            scheme = node.get("prepend_scheme")
            if scheme is None:
                scheme = "always" if node.get("add_prefix_space", True) else "never"
            if scheme not in ("always", "first", "never"):
                raise self.fail(where, f"Metaspace prepend_scheme {scheme!r} is unknown")
            return [_metaspace_pre(replacement, scheme, bool(node.get("split", True)))]
        if t == "Digits":
            rx = _compile(r"\p{N}" if node.get("individual_digits") else r"\p{N}+")
            return [lambda pieces: _split_pieces(pieces, _regex_finder(rx), "isolated")]
        raise self.fail(where, f"pre-tokenizer {t!r} is not supported (supported: Sequence, "
                               "Split, ByteLevel, Metaspace, Digits)")

    # -- decoders ----------------------------------------------------------------------------
    def decoder(self, node: Any) -> tuple[_Chain, bool, bool, list[tuple[str, str]]]:
        """(chain, has ByteLevel, has ByteFallback, per-token text replacements)."""
        if node is None:
            return _Chain([_JoinStage]), False, False, []
        flat: list[tuple[str, dict[str, Any]]] = []

        def walk(n: Any, where: str) -> None:
            t = self.kind(n, where)
            if t == "Sequence":
                items = n.get("decoders")
                if not isinstance(items, list):
                    raise self.fail(where, "Sequence needs a 'decoders' list")
                for k, item in enumerate(items):
                    walk(item, f"{where}.decoders[{k}]")
            else:
                flat.append((where, n))
        walk(node, "decoder")

        stages: list[Callable[[], _Stage]] = []
        replacements: list[tuple[str, str]] = []
        fused = byte_level = byte_fallback = False
        for where, n in flat:
            t = n["type"]
            if t == "Replace":
                pat, literal = self.pattern(n, where)
                content = str(n.get("content", ""))
                if fused and (not literal or len(pat) != 1):
                    raise self.fail(where, "Replace after Fuse/ByteLevel must be a one-char "
                                           "string (unsupported decoder order)")
                old: str | re.Pattern[str] = pat if literal else self.regex(pat, where)
                stages.append(functools.partial(_ReplaceStage, old, content))
                if literal:
                    replacements.append((pat, content))
            elif t == "ByteFallback":
                if fused:
                    raise self.fail(where, "ByteFallback after Fuse/ByteLevel is not supported")
                stages.append(_ByteFallbackStage)
                byte_fallback = True
            elif t == "Fuse":
                stages.append(_FuseStage)
                fused = True
            elif t == "Strip":
                content = str(n.get("content", " "))
                if len(content) != 1:
                    raise self.fail(where, "Strip content must be one character")
                stages.append(functools.partial(_StripStage, content, int(n.get("start", 0)),
                                                int(n.get("stop", 0))))
            elif t == "Metaspace":
                rep = str(n.get("replacement", SPACE))
                scheme = n.get("prepend_scheme")
                prepend = (scheme != "never") if scheme is not None else \
                    bool(n.get("add_prefix_space", True))
                stages.append(functools.partial(_MetaspaceStage, rep, prepend))
                replacements.append((rep, " "))
            elif t == "ByteLevel":
                if fused:
                    raise self.fail(where, "ByteLevel after Fuse is not supported")
                stages.append(_ByteLevelStage)
                fused = byte_level = True
            else:
                raise self.fail(where, f"decoder {t!r} is not supported (supported: Sequence, "
                                       "ByteLevel, ByteFallback, Replace, Fuse, Strip, Metaspace)")
        return _Chain(stages), byte_level, byte_fallback, replacements

    # -- post-processor ----------------------------------------------------------------------
    def post_processor(self, node: Any, where: str = "post_processor"
                       ) -> tuple[list[int], list[int]]:
        """Special ids the post-processor puts before and after a single sequence."""
        if node is None:
            return [], []
        t = self.kind(node, where)
        if t == "ByteLevel":
            return [], []
        if t == "Sequence":
            before: list[int] = []
            after: list[int] = []
            for k, item in enumerate(node.get("processors") or []):
                b, a = self.post_processor(item, f"{where}.processors[{k}]")
                before, after = before + b, a + after
            return before, after
        if t == "TemplateProcessing":
            specials = self.obj(node.get("special_tokens", {}), f"{where}.special_tokens")
            before, after, seen = [], [], False
            for k, item in enumerate(node.get("single") or []):
                item = self.obj(item, f"{where}.single[{k}]")
                if "Sequence" in item:
                    seen = True
                elif "SpecialToken" in item:
                    name = item["SpecialToken"].get("id")
                    ids = self.obj(specials.get(name), f"{where}.special_tokens.{name}").get("ids")
                    if not isinstance(ids, list):
                        raise self.fail(f"{where}.special_tokens.{name}", "expected 'ids'")
                    (after if seen else before).extend(int(i) for i in ids)
            return before, after
        raise self.fail(where, f"post-processor {t!r} is not supported (supported: "
                               "TemplateProcessing, ByteLevel, Sequence)")


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TokenizerError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: not valid JSON: {exc}") from None


def _config_token(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def tokenizer_from_json(path: Path) -> Tokenizer:
    """Build a tokenizer from a Hugging Face tokenizer.json (and tokenizer_config.json /
    generation_config.json beside it, for bos/eos, add_bos/add_eos and the chat template)."""
    path = Path(path)
    doc = _load_json(path)
    r = _JsonReader(path)
    doc = r.obj(doc, "top level")
    model = r.obj(doc.get("model"), "model")
    mtype = model.get("type", "BPE" if "merges" in model else None)
    if mtype != "BPE":
        raise r.fail("model.type", f"model {mtype!r} is not supported: expected 'BPE'")
    if model.get("dropout") not in (None, 0, 0.0):
        raise r.fail("model.dropout", "BPE dropout is not supported (expected null)")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise r.fail(f"model.{key}", f"{key} is not supported (expected null)")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise r.fail("model.vocab", "expected an object mapping token -> id")
    merges_raw = model.get("merges")
    if not isinstance(merges_raw, list):
        raise r.fail("model.merges", "expected a list of merges")
    merges = []
    for k, m in enumerate(merges_raw):
        if isinstance(m, str) and len(parts := m.split(" ")) == 2:
            merges.append((parts[0], parts[1]))
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m):
            merges.append((m[0], m[1]))
        else:
            raise r.fail(f"model.merges[{k}]", f"expected 'left right' or [left, right], "
                                               f"got {m!r}")
    unk = model.get("unk_token")
    if unk is not None and unk not in vocab:
        raise r.fail("model.unk_token", f"{unk!r} is not in model.vocab")
    bpe = _BpeModel(vocab, merges, unk_token=unk,
                    fuse_unk=bool(model.get("fuse_unk", False)),
                    byte_fallback=bool(model.get("byte_fallback", False)),
                    ignore_merges=bool(model.get("ignore_merges", False)),
                    where=f"{path}: model.merges")

    added: list[AddedToken] = []
    for k, item in enumerate(doc.get("added_tokens") or []):
        item = r.obj(item, f"added_tokens[{k}]")
        if not isinstance(item.get("id"), int) or not isinstance(item.get("content"), str):
            raise r.fail(f"added_tokens[{k}]", "expected 'id' (int) and 'content' (str)")
        added.append(AddedToken(item["id"], item["content"], bool(item.get("special", False)),
                                bool(item.get("lstrip", False)), bool(item.get("rstrip", False)),
                                bool(item.get("single_word", False)),
                                bool(item.get("normalized", not item.get("special", False)))))
    size = max([*vocab.values(), *(t.id for t in added)]) + 1
    tokens = [""] * size
    for tok, tid in vocab.items():
        tokens[tid] = tok
    for t in added:
        tokens[t.id] = t.content
    by_text = {t: i for i, t in enumerate(tokens) if t}

    normalizers = r.normalizers(doc.get("normalizer"))
    pre = r.pre_tokenizers(doc.get("pre_tokenizer"))
    chain, byte_level, byte_fallback, replacements = r.decoder(doc.get("decoder"))
    before, after = r.post_processor(doc.get("post_processor"))

    config: dict[str, Any] = {}
    if (cfg_path := path.with_name("tokenizer_config.json")).exists():
        config = r.obj(_load_json(cfg_path), str(cfg_path))
    gen: dict[str, Any] = {}
    if (gen_path := path.with_name("generation_config.json")).exists():
        gen = r.obj(_load_json(gen_path), str(gen_path))

    def lookup(name: str) -> int | None:
        text = _config_token(config.get(f"{name}_token"))
        if text is None:
            return None
        if text not in by_text:
            raise TokenizerError(f"{cfg_path}: {name}_token {text!r} is not in the vocabulary")
        return by_text[text]

    bos_id = lookup("bos")
    if bos_id is None and len(before) == 1:
        bos_id = before[0]
    eos_id = lookup("eos")
    if eos_id is None and len(after) == 1:
        eos_id = after[0]
    if eos_id is None and isinstance(gen.get("eos_token_id"), int):
        eos_id = gen["eos_token_id"]
    add_bos = bool(config.get("add_bos_token", bool(before)))
    add_eos = bool(config.get("add_eos_token", bool(after)))
    gen_eos = gen.get("eos_token_id")
    extra = gen_eos if isinstance(gen_eos, list) else [gen_eos] if isinstance(gen_eos, int) else []
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return HFTokenizer(
        tokens, added, bpe, normalizers=normalizers, pre_tokenizers=pre, decoder=chain,
        byte_level=byte_level, byte_fallback=byte_fallback, replacements=replacements,
        bos_id=bos_id, eos_id=eos_id, add_bos=add_bos and bos_id is not None,
        add_eos=add_eos and eos_id is not None, extra_eot_ids=[int(i) for i in extra],
        chat_template=template if isinstance(template, str) else None)
