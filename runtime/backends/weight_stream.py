"""Weights under a memory plan: float32 when resident, quantized tiles otherwise, streamed
layers read ahead by a background thread and given back to the kernel once used.

The forward pass brackets each unit (a layer, the output head) with `enter` and `leave`.
`enter` waits for the unit's read-ahead and starts the next streamed unit's, so disk reads
overlap compute; `leave` releases a streamed unit's pages: MADV_DONTNEED drops them from this
process's mapping and POSIX_FADV_DONTNEED from the page cache (which a cgroup charges too).
The read-ahead is explicit `preadv` into one reused 1 MiB buffer (the GIL is released while the
kernel reads), after an madvise(WILLNEED) hint, so that the compute thread then takes only minor
faults on pages already in the page cache.

Every weight product goes through `WeightStore.matmul`, which is where one numeric property of
the runtime lives: like llama.cpp, products with Q4_0 and Q8_0 weights quantize the activations
to Q8_0 blocks first (`q8_activations`), whatever tier the weight is in (a float32 copy, tiles,
streamed), so that the OpenCL backend's integer dot products (runtime/kernels/matmul.cl) compute
the same numbers as this reference and every budget gives the same tokens.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T

from runtime.memory_plan import TILE_BYTES, Plan
from runtime.model_file import ModelSource, TensorRef

PAGE = mmap.PAGESIZE
_libc: Any = None


def _madvise(addr: int, length: int, advice: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    start = addr - addr % PAGE
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(addr + length - start), advice)


def file_span(ref: TensorRef) -> tuple[str, int, int, int] | None:
    """(file, offset in it, address in memory, length) of a memory-mapped tensor's bytes."""
    root = ref.raw
    while isinstance(root.base, np.ndarray):
        root = root.base
    if not isinstance(root.base, mmap.mmap) or not isinstance(root, np.memmap):
        return None
    addr = ref.raw.ctypes.data
    return str(root.filename), addr - root.ctypes.data + int(root.offset), addr, ref.nbytes


def release_pages(ref: TensorRef, drop_cache: bool = True) -> None:
    """Give a mapped tensor's pages back, e.g. once a copy of it lives elsewhere: dropped from
    this process's map and, with `drop_cache`, from the page cache (a cgroup charges both)."""
    span = file_span(ref)
    if span is None:
        return
    path, offset, addr, length = span
    _madvise(addr, length, mmap.MADV_DONTNEED)
    if not drop_cache:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# Weight types whose products take Q8_0-quantized activations, as every quantized type does in
# llama.cpp (vec_dot_q4_0_q8_0, vec_dot_q4_K_q8_K, ...): the integer dot products that make them
# fast need int8 on both sides. F32/F16 weights multiply x as it is.
Q8_ACTIVATION_TYPES = frozenset({T.Q4_0, T.Q8_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K})


def q8_activations(x: np.ndarray) -> np.ndarray:
    """x (..., n) rounded to Q8_0 blocks along the last axis and back to float32: per 32 values
    d = max|x| / 127, q = rint(x * (1 / d)) (round half to even), value q * d. Every step is one
    IEEE float32 operation, as in matmul.cl's quantize_q8, so both give the same q and d; d is
    kept in float32 (llama.cpp stores it as f16)."""
    blocks = x.astype(np.float32, copy=False).reshape(*x.shape[:-1], -1, 32)
    d = np.max(np.abs(blocks), axis=-1, keepdims=True) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    return (np.rint(blocks * inv) * d).reshape(x.shape)


def weight_input(x: np.ndarray, qtype: T) -> np.ndarray:
    """What a product with a `qtype` weight multiplies: x itself, or its Q8_0 rounding."""
    return q8_activations(x) if qtype in Q8_ACTIVATION_TYPES else x


def quantized_matmul(x: np.ndarray, ref: TensorRef) -> np.ndarray:
    """x @ W.T, W dequantized row tile by row tile into at most TILE_BYTES of float32."""
    n_rows, n_cols = ref.shape
    step = max(1, TILE_BYTES // (4 * n_cols))
    out = np.empty((x.shape[0], n_rows), np.float32)
    for r in range(0, n_rows, step):
        out[:, r:r + step] = x @ ref.rows(r, min(r + step, n_rows)).T
    return out


class OpenFiles:
    """Read-only descriptors of the model's files, opened once and shared by the threads that
    stream them, each with the read-ahead advice its reads want; closed together."""

    def __init__(self) -> None:
        self._fds: dict[tuple[str, int | None], int] = {}
        self._lock = threading.Lock()

    def get(self, path: str, advice: int | None = None) -> int:
        with self._lock:
            if (path, advice) not in self._fds:
                fd = os.open(path, os.O_RDONLY)
                if advice is not None:
                    os.posix_fadvise(fd, 0, 0, advice)
                self._fds[path, advice] = fd
            return self._fds[path, advice]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class WeightStore:
    """Weights by name for the numpy backend, placed as `plan` says (no plan: all float32)."""

    def __init__(self, source: ModelSource, plan: Plan | None):
        self.source, self.plan = source, plan
        self.tier = plan.tiers() if plan and plan.budget is not None else {}
        self.f32: dict[str, np.ndarray] = {}
        self.units = [u.tensors for u in plan.units] if plan else []
        self.streamed = [i for i, u in enumerate(plan.units) if u.tier == "stream"] \
            if plan else []
        self.loads = 0  # weight matrices dequantized to float32 (whole) so far
        self.reads = 0  # bytes read ahead from disk so far
        self.released = 0  # bytes of streamed units given back so far
        self.files = OpenFiles()
        self._pending: dict[int, Future[None]] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="claw-prefetch") \
            if self.streamed else None

    # -- lookups -------------------------------------------------------------------------
    def __call__(self, name: str) -> np.ndarray:
        """The whole tensor as float32 (kept): small tensors and the f32 tier."""
        array = self.f32.get(name)
        if array is None:
            ref = self.source.tensors[name]
            array = self.f32[name] = ref.to_float32()
            if len(ref.shape) == 2:
                self.loads += 1
                if self.tier and ref.qtype.name != "F32":
                    self._release([ref])  # the float32 copy replaces the file's pages
        return array

    def matmul(self, x: np.ndarray, name: str) -> np.ndarray:
        """x @ W.T for x (T, cols): from float32 when resident, else row tile by row tile, each
        dequantized into at most TILE_BYTES of scratch. Quantized weights multiply x rounded
        to Q8_0 blocks (see the module docstring), decided by the tensor's GGUF type."""
        x = weight_input(x, self.source.tensors[name].qtype)
        if self.tier.get(name, "f32") == "f32":
            return x @ self(name).T
        return quantized_matmul(x, self.source.tensors[name])

    # -- streaming ------------------------------------------------------------------------
    def enter(self, unit: int) -> None:
        """Unit `unit` is about to run: wait for its read-ahead, start the next one's."""
        if not self.streamed:
            return
        pending = self._pending.pop(unit, None)
        if pending is not None:
            pending.result()
        later = [i for i in self.streamed if i > unit] or self.streamed
        nxt = later[0]
        if nxt != unit and nxt not in self._pending:
            self._pending[nxt] = self._pool.submit(self._read_ahead, nxt)

    def leave(self, unit: int) -> None:
        """Unit `unit` has run: give a streamed unit's pages back."""
        if self.streamed and self.plan.units[unit].tier == "stream" and unit not in self._pending:
            self._release([self.source.tensors[t] for t in self.units[unit]])

    def _fd(self, path: str) -> int:
        return self.files.get(path)

    def _read_ahead(self, unit: int) -> None:
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        for t in self.units[unit]:
            span = file_span(self.source.tensors[t])
            if span is None:
                continue
            path, offset, addr, length = span
            _madvise(addr, length, mmap.MADV_WILLNEED)
            fd, done = self._fd(path), 0
            while done < length:
                n = os.preadv(fd, [view[:min(len(buf), length - done)]], offset + done)
                if n <= 0:
                    break
                done += n
            self.reads += done

    def _release(self, refs: list[TensorRef]) -> None:
        for ref in refs:
            span = file_span(ref)
            if span is None:
                continue
            path, offset, addr, length = span
            _madvise(addr, length, mmap.MADV_DONTNEED)
            os.posix_fadvise(self._fd(path), offset, length, os.POSIX_FADV_DONTNEED)
            self.released += length

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.files.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit there is nothing to release
            self.close()
