"""Hugging Face llama/qwen2 checkpoints → GGUF, the way llama.cpp's converter lays them out.

Used to make test and benchmark models here (no weights can be downloaded) and by
`claw runtime convert`. The output is standard GGUF: llama.cpp's tensor names and metadata
keys, Llama's q/k rows permuted for llama.cpp's adjacent-pair RoPE, Llama 3 frequency factors
as a `rope_freqs` tensor, and each weight stored in the requested type (norms and biases stay
F32). Written to a temporary file and renamed, so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from runtime.backends.numpy_backend import rope_inv_freq
from runtime.config import ModelConfig, RopeScaling
from runtime.errors import ModelError
from runtime.files import publish
from runtime.model_file import ModelSource, open_model, read_json
from runtime.quant import block_shape, quantize

FILE_TYPES = {  # llama.cpp's general.file_type numbers (LLAMA_FTYPE_*)
    T.F32: 0, T.F16: 1, T.Q4_0: 2, T.Q4_1: 3, T.Q8_0: 7, T.Q5_0: 8, T.Q5_1: 9,
    T.Q4_K: 15, T.Q5_K: 17, T.Q6_K: 18, T.BF16: 32,
}


def permute_for_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's rows from HF's (first half, second half) to interleaved pairs.

    HF rotates x[i] with x[i + D/2]; llama.cpp's Llama rotates x[2i] with x[2i+1]. Row
    r = h·D + half·D/2 + i moves to h·D + 2i + half.
    """
    rows = w.shape[0]
    return (w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def llama3_freq_factors(cfg: ModelConfig) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores in `rope_freqs.weight` for Llama 3.1."""
    plain = rope_inv_freq(_without_scaling(cfg), None)
    scaled = rope_inv_freq(cfg, None)
    return (plain / scaled).astype(np.float32)


def _without_scaling(cfg: ModelConfig) -> ModelConfig:
    from dataclasses import replace

    return replace(cfg, rope_scaling=RopeScaling())


def choose_type(name: str, shape: tuple[int, ...], wanted: T,
                overrides: Mapping[str, T] | None = None) -> T:
    """1-D tensors stay F32; a row length that the block does not divide falls back."""
    if len(shape) == 1:
        return T.F32
    for suffix, qtype in (overrides or {}).items():
        if name.endswith(suffix):
            wanted = qtype
    for qtype in (wanted, T.Q8_0, T.F16):
        if shape[-1] % block_shape(qtype)[0] == 0:
            return qtype
    return T.F32


def convert(
    source_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    qtype: T = T.F16,
    *,
    overrides: Mapping[str, T] | None = None,
    tokenizer_metadata: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write `source_dir` (a HF directory) as GGUF at `out_path` with weights in `qtype`."""
    src: ModelSource = open_model(source_dir)
    if src.format != "safetensors":
        raise ModelError(f"{source_dir}: expected a Hugging Face directory to convert")
    cfg = src.config
    with gguf_output(out_path, cfg.arch) as writer:
        _write_metadata(writer, cfg, qtype, tokenizer_metadata)
        if cfg.rope_scaling.kind == "llama3":
            writer.add_tensor("rope_freqs.weight", llama3_freq_factors(cfg))
        for name, ref in src.tensors.items():
            data = ref.to_float32()
            if cfg.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = cfg.n_heads if "attn_q" in name else cfg.n_kv_heads
                data = permute_for_llama_cpp(data, heads)
            target = choose_type(name, ref.shape, qtype, overrides)
            if progress:
                progress(f"{name} {ref.shape} → {target.name}")
            add_typed_tensor(writer, name, data, target)
    return Path(out_path)


def _write_metadata(w: gguf.GGUFWriter, cfg: ModelConfig, qtype: T,
                    tokenizer_metadata: Mapping[str, Any] | None) -> None:
    w.add_name(cfg.name or "clawforge-converted")
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    if cfg.head_dim != cfg.dim // cfg.n_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.rope_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(FILE_TYPES.get(qtype, 1))
    if cfg.rope_scaling.kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling.factor)
    for key, value in (tokenizer_metadata or {}).items():
        _add_kv(w, key, value)


def _pre_tokenizer_name(pre: dict[str, Any] | None, source: Path) -> str:
    """llama.cpp's `tokenizer.ggml.pre` name for a byte-level pre-tokenizer, by its regex."""
    from runtime.tokenizer import LLAMA3_PATTERN, QWEN2_PATTERN

    steps = (pre or {}).get("pretokenizers") or ([pre] if pre else [])
    kinds = [step.get("type") for step in steps]
    split = next((s for s in steps if s.get("type") == "Split"), None)
    if split is not None:
        regex = split.get("pattern", {}).get("Regex", "")
        as_gguf = regex.replace("(?i:'s|'t|'re|'ve|'m|'ll|'d)",
                                "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])")
        if as_gguf == LLAMA3_PATTERN:
            return "llama-bpe"
        if as_gguf == QWEN2_PATTERN:
            return "qwen2"
        raise ModelError(f"{source}: pre-tokenizer regex {regex[:60]!r}… is not one llama.cpp "
                         "names (expected Llama 3's or Qwen2's)")
    if kinds == ["Digits", "ByteLevel"]:
        return "smollm"
    if kinds == ["ByteLevel"]:
        return "gpt-2"  # llama.cpp knows this name only with the hyphen
    raise ModelError(f"{source}: pre-tokenizer {kinds} has no llama.cpp name "
                     "(expected ByteLevel, Digits+ByteLevel or a Llama 3/Qwen2 Split)")


def _template_specials(post: Any) -> set[str]:
    """Special tokens a TemplateProcessing post-processor puts around a single sequence."""
    if not isinstance(post, dict):
        return set()
    if post.get("type") == "Sequence":
        return set().union(*(_template_specials(p) for p in post.get("processors", [])))
    if post.get("type") != "TemplateProcessing":
        return set()
    return {part["SpecialToken"]["id"] for part in post.get("single", [])
            if "SpecialToken" in part}


def tokenizer_metadata(hf_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """GGUF tokenizer keys for a byte-level BPE tokenizer.json, as llama.cpp's converter writes
    them (`tokenizer.ggml.model = "gpt2"`): tokens in id order, merges, token types, pre-tokenizer
    name, special ids and the chat template from tokenizer_config.json."""
    folder = Path(hf_dir)
    path = folder / "tokenizer.json"
    data = read_json(path, "the model's tokenizer")
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ModelError(f"{path}: only byte-level BPE tokenizers convert to GGUF here "
                         "(expected model.type BPE without byte_fallback; Llama-2 style "
                         "vocabularies come from tokenizer.model)")
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    vocab = {**model["vocab"], **{t["content"]: i for i, t in added.items()}}
    tokens = [""] * (max(vocab.values()) + 1)
    for text, i in vocab.items():
        tokens[i] = text
    types = [(3 if added[i]["special"] else 4) if i in added else 1 for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": _pre_tokenizer_name(data.get("pre_tokenizer"), path),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    config_path = folder / "tokenizer_config.json"
    config = read_json(config_path, "tokenizer settings") if config_path.is_file() else {}

    def token_id(value: Any) -> int | None:
        text = value.get("content") if isinstance(value, dict) else value
        return vocab.get(text) if isinstance(text, str) else None

    bos, eos = token_id(config.get("bos_token")), token_id(config.get("eos_token"))
    if bos is not None:
        meta["tokenizer.ggml.bos_token_id"] = bos
    if eos is not None:
        meta["tokenizer.ggml.eos_token_id"] = eos
    meta["tokenizer.ggml.add_bos_token"] = bool(config.get(
        "add_bos_token", bos is not None and tokens[bos] in _template_specials(
            data.get("post_processor"))))
    if isinstance(config.get("chat_template"), str):
        meta["tokenizer.chat_template"] = config["chat_template"]
    return meta


def _add_kv(w: gguf.GGUFWriter, key: str, value: Any) -> None:
    """Typed metadata the way llama.cpp's converter writes tokenizer keys."""
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, list | tuple):
        w.add_array(key, list(value))  # element type from the first item, as llama.cpp does
    else:
        raise ModelError(f"metadata {key}: cannot write a {type(value).__name__}")


def add_typed_tensor(writer: gguf.GGUFWriter, name: str, data: np.ndarray, qtype: T,
                     importance: np.ndarray | None = None) -> None:
    """Adds `data` to a GGUF being written, stored as `qtype` (F32, F16 or a block type; a
    searched block type weights its columns by `importance`, see quant.quantize)."""
    if qtype == T.F32:
        writer.add_tensor(name, data.astype(np.float32))
    elif qtype == T.F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, quantize(data, qtype, importance=importance), raw_dtype=qtype)


@contextmanager
def gguf_output(out: str | os.PathLike[str], arch: str) -> Iterator[gguf.GGUFWriter]:
    """A GGUFWriter whose file appears at `out` only once everything is written: the data goes
    to a temporary file beside it, renamed at the end and removed on any failure."""
    out = Path(out)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        publish(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
