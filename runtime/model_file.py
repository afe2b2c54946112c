"""Opening model files: GGUF (through the `gguf` package, memory-mapped) and Hugging Face
directories (config.json + *.safetensors + tokenizer.json, memory-mapped here).

Both become a `ModelSource`: a config, and tensors under llama.cpp's names, each a `TensorRef`
whose bytes stay in the mapped file until a backend asks for them. Nothing is copied into RAM
at open, and everything a corrupt file could lie about (sizes, offsets, shapes, types) is
checked against the file before it is trusted.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T

from runtime.config import ModelConfig, config_from_gguf, config_from_hf
from runtime.errors import ModelError
from runtime.quant import SUPPORTED, QuantError, dequantize, row_bytes

MAX_ELEMENTS = 1 << 40
GGUF_MAGIC = b"GGUF"


@dataclass
class TensorRef:
    """One tensor's type, shape (numpy order: rows, cols) and its bytes in the mapped file."""

    name: str
    qtype: T
    shape: tuple[int, ...]
    raw: np.ndarray  # uint8 view into the file, or a typed view for F32/F16

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32: dequantizes only those rows' blocks."""
        n_cols = self.shape[-1]
        per_row = row_bytes(self.qtype, n_cols)
        flat = self.raw.reshape(-1).view(np.uint8)
        return dequantize(flat[start * per_row: stop * per_row], self.qtype, (stop - start, n_cols))

    def to_float32(self) -> np.ndarray:
        return dequantize(self.raw, self.qtype, self.shape)


@dataclass
class ModelSource:
    path: Path
    format: str
    config: ModelConfig
    tensors: dict[str, TensorRef]
    metadata: dict[str, Any] = field(default_factory=dict)
    load_tokenizer: Callable[[], Any] | None = None

    def bytes_by_type(self) -> dict[str, int]:
        totals: Counter[str] = Counter()
        for ref in self.tensors.values():
            totals[ref.qtype.name] += ref.nbytes
        return dict(totals)

    def n_params(self) -> int:
        return sum(int(np.prod(ref.shape)) for ref in self.tensors.values())


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a llama-family model needs, under llama.cpp's names, with its shape."""
    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (cfg.vocab_size, cfg.dim),
        "output_norm.weight": (cfg.dim,),
    }
    if not cfg.tied_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, cfg.dim)
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        shapes |= {
            b + "attn_norm.weight": (cfg.dim,),
            b + "attn_q.weight": (q_dim, cfg.dim),
            b + "attn_k.weight": (kv_dim, cfg.dim),
            b + "attn_v.weight": (kv_dim, cfg.dim),
            b + "attn_output.weight": (cfg.dim, q_dim),
            b + "ffn_norm.weight": (cfg.dim,),
            b + "ffn_gate.weight": (cfg.ffn_dim, cfg.dim),
            b + "ffn_up.weight": (cfg.ffn_dim, cfg.dim),
            b + "ffn_down.weight": (cfg.dim, cfg.ffn_dim),
        }
        if cfg.qkv_bias:
            shapes |= {b + "attn_q.bias": (q_dim,), b + "attn_k.bias": (kv_dim,),
                       b + "attn_v.bias": (kv_dim,)}
    return shapes


def _check_tensors(source: ModelSource) -> None:
    shapes = expected_shapes(source.config)
    if "rope_freqs.weight" in source.tensors:  # llama3 frequency factors, GGUF only
        shapes["rope_freqs.weight"] = (source.config.rope_dim // 2,)
    for name, shape in shapes.items():
        ref = source.tensors.get(name)
        if ref is None:
            raise ModelError(f"{source.path}: tensor {name} is missing "
                             f"(expected shape {shape} for this {source.config.arch} model)")
        if tuple(ref.shape) != shape:
            raise ModelError(f"{source.path}: tensor {name} has shape {tuple(ref.shape)} "
                             f"(expected {shape})")
        if ref.qtype not in SUPPORTED:
            raise ModelError(f"{source.path}: tensor {name} has type {ref.qtype.name}, which is "
                             f"not supported (expected one of: "
                             f"{', '.join(sorted(t.name for t in SUPPORTED))})")


def open_model(path: str | os.PathLike[str]) -> ModelSource:
    """Open a GGUF file or a Hugging Face model directory, checked and memory-mapped."""
    path = Path(path)
    if path.is_dir():
        source = _open_hf_dir(path)
    elif path.is_file():
        source = _open_gguf(path)
    else:
        raise ModelError(f"{path}: no such model file or directory")
    _check_tensors(source)
    return source


# ---------------------------------------------------------------------------------- GGUF

def _gguf_header_sane(path: Path, size: int) -> None:
    """Reject what the gguf reader would choke on slowly: wrong magic, absurd counts."""
    with path.open("rb") as f:
        head = f.read(24)
    if len(head) < 24:
        raise ModelError(f"{path}: file is {size} bytes, too short for a GGUF header "
                         "(expected at least 24 bytes)")
    if head[:4] != GGUF_MAGIC:
        raise ModelError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected b'GGUF')")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise ModelError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
    # Each key/value takes at least 8 (key length) + 4 (type) + 1 bytes; each tensor info
    # at least 8 + 4 + 8 + 4 + 8 bytes: more entries than that cannot fit in the file.
    if n_kv > size // 13 or n_tensors > size // 32:
        raise ModelError(f"{path}: header claims {n_tensors} tensors and {n_kv} metadata keys, "
                         f"more than a {size}-byte file can hold (expected a truncated or "
                         "corrupt file to be replaced)")


def _field_value(field: Any) -> Any:
    value = field.contents()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def _open_gguf(path: Path) -> ModelSource:
    from gguf import GGUFReader

    size = path.stat().st_size
    _gguf_header_sane(path, size)
    try:
        reader = GGUFReader(path)
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, struct.error,
            UnicodeDecodeError, MemoryError) as exc:
        raise ModelError(f"{path}: corrupt GGUF file: {type(exc).__name__}: "
                         f"{str(exc)[:200]}") from None
    meta: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = _field_value(fld)
        except (UnicodeDecodeError, ValueError, IndexError) as exc:
            raise ModelError(f"{path}: metadata {key} is unreadable ({exc})") from None
    tensors: dict[str, TensorRef] = {}
    for t in reader.tensors:
        dims = [int(d) for d in t.shape]
        n = 1
        for d in dims:
            n *= d
        if not dims or min(dims) < 1 or n > MAX_ELEMENTS:
            raise ModelError(f"{path}: tensor {t.name} has dimensions {dims} "
                             f"(expected positive sizes, at most {MAX_ELEMENTS} elements)")
        if t.data_offset + int(t.data.nbytes) > size or t.data.nbytes < t.n_bytes:
            raise ModelError(f"{path}: tensor {t.name} data ends past the end of the file "
                             f"(offset {t.data_offset}, {t.n_bytes} bytes, file {size} bytes)")
        tensors[t.name] = TensorRef(t.name, T(t.tensor_type), tuple(reversed(dims)), t.data)
    tokens = meta.get("tokenizer.ggml.tokens")
    arch = meta.get("general.architecture")
    vocab = meta.get(f"{arch}.vocab_size") or (len(tokens) if isinstance(tokens, list) else None)
    if vocab is None and "token_embd.weight" in tensors:
        vocab = tensors["token_embd.weight"].shape[0]
    config = config_from_gguf(meta, str(path), vocab_size=int(vocab or 0),
                              has_output="output.weight" in tensors,
                              has_rope_freqs="rope_freqs.weight" in tensors)

    def load_tokenizer() -> Any:
        from runtime.tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(meta)

    return ModelSource(path, "gguf", config, tensors, meta, load_tokenizer)


# ------------------------------------------------------------------- Hugging Face directory

_HF_NAMES = [
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", r"blk.\1.attn_q.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", r"blk.\1.attn_k.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", r"blk.\1.attn_v.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"blk.\1.attn_output.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"blk.\1.ffn_gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"blk.\1.ffn_up.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"blk.\1.ffn_down.weight"),
]
_SAFETENSORS_TYPES = {"F32": (T.F32, 4), "F16": (T.F16, 2), "BF16": (T.BF16, 2)}


def gguf_name(hf_name: str) -> str | None:
    """llama.cpp's name for a Hugging Face llama/qwen2 tensor (None: not a weight we use)."""
    for pattern, repl in _HF_NAMES:
        if re.fullmatch(pattern, hf_name):
            return re.sub(pattern, repl, hf_name)
    return None


def read_safetensors(path: Path) -> dict[str, TensorRef]:
    """Memory-map one .safetensors file: an 8-byte header length, a JSON header, then data.

    Read here rather than with the safetensors package because its numpy loader cannot give
    bfloat16, the dtype most checkpoints ship in.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelError(f"{path}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise ModelError(f"{path}: header length {n} is past the end of the file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"{path}: header is not valid JSON ({exc})") from None
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else \
        np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            qtype, width = _SAFETENSORS_TYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            start, stop = (int(o) for o in info["data_offsets"])
        except KeyError as exc:
            raise ModelError(f"{path}: tensor {name}: unsupported or missing {exc} "
                             "(expected dtype F32, F16 or BF16, shape and data_offsets)") from None
        count = int(np.prod(shape)) if shape else 1
        if not 0 <= start <= stop <= data.size or stop - start != count * width:
            raise ModelError(f"{path}: tensor {name} bytes [{start}, {stop}) do not fit its "
                             f"shape {shape} or the file")
        out[name] = TensorRef(name, qtype, shape, data[start:stop])
    return out


def read_json(path: Path, expected: str) -> Any:
    """A JSON file of a model directory; a missing or malformed one is a ModelError."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path.parent}: no {path.name} (expected {expected})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None


def _open_hf_dir(path: Path) -> ModelSource:
    config_path = path / "config.json"
    cfg = read_json(config_path, "a Hugging Face model directory")
    config = config_from_hf(cfg, str(config_path))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path}: no *.safetensors files (expected the model's weights)")
    tensors: dict[str, TensorRef] = {}
    for file in files:
        for hf_name, ref in read_safetensors(file).items():
            name = gguf_name(hf_name)
            if name is not None:
                ref.name = name
                tensors[name] = ref
    if config.tied_embeddings:
        tensors.pop("output.weight", None)

    def load_tokenizer() -> Any:
        from runtime.tokenizer import tokenizer_from_json

        return tokenizer_from_json(path / "tokenizer.json")

    return ModelSource(path, "safetensors", config, tensors, {"config": cfg}, load_tokenizer)


__all__ = ["ModelSource", "QuantError", "TensorRef", "expected_shapes", "gguf_name",
           "open_model", "read_json"]
