"""Bad model files: each gives one clear ModelError; none crashes or allocates wildly.

A small valid GGUF is written with the gguf package, then broken on purpose (truncated, wrong
magic and version, offsets past the end, absurd dimensions, missing tensors, metadata of the
wrong type) and fuzzed: 600 mutated copies, each opened and, when it opens, run.
"""

from __future__ import annotations

import struct
import time
import tracemalloc

import gguf
import numpy as np
import pytest

from runtime.backends.numpy_backend import NumpyBackend
from runtime.errors import ModelError
from runtime.model_file import open_model

pytestmark = pytest.mark.unit

DIM, FFN, LAYERS, HEADS, KV, VOCAB = 32, 64, 1, 4, 2, 64


def write_model(path, *, skip: str = "", meta_override: dict | None = None,
                arch: str = "llama", dtypes: dict | None = None) -> None:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, arch)
    meta = {
        f"{arch}.context_length": 128, f"{arch}.embedding_length": DIM,
        f"{arch}.block_count": LAYERS, f"{arch}.feed_forward_length": FFN,
        f"{arch}.attention.head_count": HEADS, f"{arch}.attention.head_count_kv": KV,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
    }
    meta.update(meta_override or {})
    for key, value in meta.items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    shapes = {"token_embd.weight": (VOCAB, DIM), "output_norm.weight": (DIM,),
              "output.weight": (VOCAB, DIM)}
    for i in range(LAYERS):
        shapes |= {f"blk.{i}.attn_norm.weight": (DIM,), f"blk.{i}.attn_q.weight": (DIM, DIM),
                   f"blk.{i}.attn_k.weight": (KV * DIM // HEADS, DIM),
                   f"blk.{i}.attn_v.weight": (KV * DIM // HEADS, DIM),
                   f"blk.{i}.attn_output.weight": (DIM, DIM), f"blk.{i}.ffn_norm.weight": (DIM,),
                   f"blk.{i}.ffn_gate.weight": (FFN, DIM), f"blk.{i}.ffn_up.weight": (FFN, DIM),
                   f"blk.{i}.ffn_down.weight": (DIM, FFN)}
    for name, shape in shapes.items():
        if name != skip:
            dtype = (dtypes or {}).get(name, np.float32)
            w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "good.gguf"
    write_model(path)
    return path


def expect_error(path, *parts: str) -> str:
    with pytest.raises(ModelError) as exc:
        open_model(path)
    message = str(exc.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message
    return message


def test_the_good_file_opens_and_runs(good):
    src = open_model(good)
    backend = NumpyBackend(src)
    logits = backend.forward([1, 2, 3], backend.new_cache(8))
    assert logits.shape == (1, VOCAB) and np.isfinite(logits).all()


def test_missing_file_and_directory_without_config(tmp_path):
    expect_error(tmp_path / "nope.gguf", "no such model file")
    expect_error(tmp_path, "no config.json")


def test_wrong_magic(good, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + good.read_bytes()[4:])
    expect_error(bad, str(bad), "not a GGUF file", "expected b'GGUF'")


def test_unsupported_version(good, tmp_path):
    data = bytearray(good.read_bytes())
    data[4:8] = struct.pack("<I", 7)
    bad = tmp_path / "v7.gguf"
    bad.write_bytes(data)
    expect_error(bad, "GGUF version 7 is not supported (expected 2 or 3)")


@pytest.mark.parametrize("keep", [10, 200, 0.5, 0.999])
def test_truncated_file(good, tmp_path, keep):
    data = good.read_bytes()
    n = keep if isinstance(keep, int) else int(len(data) * keep)
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:n])
    expect_error(bad, str(bad))


def test_absurd_counts_in_header(good, tmp_path):
    data = bytearray(good.read_bytes())
    data[8:16] = struct.pack("<Q", 1 << 62)  # tensor count
    bad = tmp_path / "count.gguf"
    bad.write_bytes(data)
    expect_error(bad, "more than a", "byte file can hold")


def test_missing_tensor(tmp_path):
    path = tmp_path / "missing.gguf"
    write_model(path, skip="blk.0.ffn_up.weight")
    expect_error(path, "tensor blk.0.ffn_up.weight is missing", "(expected shape (64, 32)")


def test_metadata_of_the_wrong_type(tmp_path):
    path = tmp_path / "type.gguf"
    write_model(path, meta_override={"llama.block_count": "two"})
    expect_error(path, "metadata llama.block_count = 'two' is not valid (expected an integer)")


def test_unknown_architecture(tmp_path):
    path = tmp_path / "arch.gguf"
    write_model(path, arch="mamba")
    expect_error(path, "architecture 'mamba' is not supported (expected one of: llama, qwen2)")


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "i32.gguf"
    write_model(path, dtypes={"output_norm.weight": np.int32})
    expect_error(path, "tensor output_norm.weight has type I32, which is not supported",
                 "(expected one of: ")


def test_shape_disagreeing_with_metadata(tmp_path):
    path = tmp_path / "shape.gguf"
    write_model(path, meta_override={"llama.feed_forward_length": 96})
    expect_error(path, "has shape (64, 32) (expected (96, 32))")


def _tensor_info_offset(data: bytes, name: str) -> int:
    return data.index(name.encode()) + len(name)


def test_tensor_offset_past_the_end(good, tmp_path):
    data = bytearray(good.read_bytes())
    at = _tensor_info_offset(data, "output.weight")  # then n_dims, dims, type, offset
    n_dims = struct.unpack_from("<I", data, at)[0]
    offset_at = at + 4 + 8 * n_dims + 4
    struct.pack_into("<Q", data, offset_at, len(data) * 4)
    bad = tmp_path / "offset.gguf"
    bad.write_bytes(data)
    expect_error(bad, str(bad))


def test_absurd_dimensions(good, tmp_path):
    data = bytearray(good.read_bytes())
    at = _tensor_info_offset(data, "output.weight")
    struct.pack_into("<Q", data, at + 4, 1 << 40)  # ne[0]
    bad = tmp_path / "dims.gguf"
    bad.write_bytes(data)
    tracemalloc.start()
    expect_error(bad, str(bad))
    assert tracemalloc.get_traced_memory()[1] < 64 << 20
    tracemalloc.stop()


def test_fuzz_600_mutated_files(good, tmp_path):
    """Random byte flips and truncations: a ModelError or a working model, fast, small."""
    original = good.read_bytes()
    header_end = original.index(b"blk.0.ffn_down.weight") + 64  # metadata + tensor infos
    rng = np.random.default_rng(1234)
    outcomes = {"error": 0, "ran": 0}
    worst = 0.0
    tracemalloc.start()
    for i in range(600):
        data = bytearray(original)
        if i % 10 == 0:
            data = data[: int(rng.integers(0, len(data)))]
        else:
            for _ in range(int(rng.integers(1, 9))):
                at = int(rng.integers(0, header_end if rng.random() < 0.8 else len(data)))
                data[at] = int(rng.integers(0, 256))
        path = tmp_path / f"fuzz{i}.gguf"
        path.write_bytes(data)
        start = time.perf_counter()
        try:
            src = open_model(path)
            backend = NumpyBackend(src)
            backend.forward([1, 2], backend.new_cache(4))
            outcomes["ran"] += 1
        except ModelError as exc:
            assert "\n" not in str(exc)
            outcomes["error"] += 1
        worst = max(worst, time.perf_counter() - start)
        path.unlink()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert outcomes["error"] > 300  # most mutations must be caught, not silently accepted
    assert worst < 2.0, f"slowest file took {worst:.2f} s"
    assert peak < 256 << 20, f"peak allocation {peak / 2**20:.0f} MiB"
