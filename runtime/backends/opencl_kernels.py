"""Thin launchers for the kernels in runtime/kernels/*.cl: buffers in, buffers out.

Each method enqueues one kernel (or two) on the device's in-order queue and returns at once;
nothing is read back unless asked (`read`). The backend chains them into a forward pass, the
tests compare each one with its numpy counterpart, and `claw runtime tune` times them.
Weights are uploaded as their raw GGUF blocks (`upload_matrix`), split by rows into several
buffers when a tensor exceeds the device's largest allocation, and on unified-memory devices
the buffers wrap the memory-mapped file instead of copying it.
"""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T

from runtime.backends.opencl_device import Device
from runtime.backends.opencl_programs import ProgramCache
from runtime.backends.opencl_replay import PerStep, Recording, i32, now
from runtime.backends.weight_stream import Q8_ACTIVATION_TYPES
from runtime.quant import row_bytes

Q8 = tuple[Any, Any]  # activations in Q8_0 blocks on the device: (int8 values, float32 scales)

FORMATS = {T.F32: "f32", T.F16: "f16", T.Q8_0: "q8_0", T.Q4_0: "q4_0", T.Q4_1: "q4_1",
           T.Q5_0: "q5_0", T.Q5_1: "q5_1", T.Q4_K: "q4_k", T.Q5_K: "q5_k", T.Q6_K: "q6_k"}


@dataclass
class Params:
    """The tuned knobs (compile-time defines) of both programs."""

    LWS: int = 1  # work-items per output row of a matmul
    RPW: int = 16  # rows per matmul work-group
    TT: int = 4  # tokens per work-item in prefill matmuls
    WG: int = 64  # work-group of row reductions and attention
    SPLIT: int = 128  # KV positions per attention work-group
    UNALIGNED: int = 0  # 1: the device loads vectors at any address (CPUs), not tuned
    DP4A: int = 0  # 1: NVIDIA's compiler takes inline PTX's dp4a (GPU decode of Q4_0/Q8_0)
    QU: int = 4  # loads in flight per work-item in GPU decode over planes (Q4_0/Q8_0)
    SHFL: int = 0  # 1: NVIDIA's warp shuffles (inline PTX) sum a row's 32 partial sums

    def matmul_defines(self) -> dict[str, int]:
        return {"LWS": self.LWS, "RPW": self.RPW, "TT": self.TT, "UNALIGNED": self.UNALIGNED,
                "DP4A": self.DP4A, "QU": self.QU, "SHFL": self.SHFL}

    def ops_defines(self) -> dict[str, int]:
        return {"WG": self.WG, "SPLIT": self.SPLIT}


FILE, X8, PLANAR = "", "x8", "p"  # layouts of a device matrix: matmul.cl's kernel name suffixes


@dataclass
class DeviceMatrix:
    """A (n_rows, n_cols) weight in its GGUF blocks: parts of (first row, rows, buffer), in
    the file's layout or repacked (`layout`: X8 by `interleave` on AVX2 CPUs for X8_TYPES,
    PLANAR by `planar` on GPUs for PLANAR_TYPES); row_bytes is the stride of a row (of a
    group of 8 / 8 for X8)."""

    qtype: T
    n_rows: int
    n_cols: int
    row_bytes: int
    parts: list[tuple[int, int, Any]] = field(default_factory=list)
    layout: str = FILE

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.row_bytes

    @property
    def layout_name(self) -> str:
        return {FILE: "file", X8: "x8", PLANAR: "planes"}[self.layout]

    @property
    def suffix(self) -> str:
        """The format's name in matmul.cl's kernels for this layout: q4_0, q4_0x8, q4_0p."""
        return FORMATS[self.qtype] + self.layout


X8_GROUP = 4  # work-items (of 8 interleaved rows each) in a work-group
X8_TYPES = (T.Q4_0, T.Q8_0, T.Q5_0, T.Q4_K, T.Q5_K)  # the types with *_<type>x8 kernels
PLANAR_TYPES = (T.Q4_0, T.Q8_0)  # ... and *_<type>p kernels (GPU decode over planes)
# ... and qgemm8_<type> (the VNNI prefill tile over the file's layout; every X8 type has
# qgemm8_<type>x8 over its own)
VNNI_TYPES = (T.Q4_0, T.Q8_0, T.Q5_0, T.Q6_K)


def pairs(rows: int, rpw: int) -> int:
    """The global size of decode's int8 kernels: a work-item for two rows, RPW a group."""
    return math.ceil(math.ceil(rows / 2) / rpw) * rpw


X8_BLOCK_COLS = {T.Q4_K: 256, T.Q5_K: 256}  # a block of interleave's groups: 32 weights or 256
X8_HEADS = {T.Q4_K: 2, T.Q5_K: 2}  # f16 fields a block starts with: d, or the K's d and dmin


def interleave(raw: np.ndarray, qtype: T, n_rows: int, n_cols: int) -> np.ndarray:
    """X8_TYPES' rows (n_rows a multiple of 8) repacked for matmul.cl's *x8 kernels: per group
    of 8 rows and block, the 8 rows' f16 scales (Q4_K/Q5_K: their d, then their dmin), then
    chunks of 32 bytes whose dword j is 4 bytes of row j's block after them (4 chunks for
    Q4_0; 5 for Q5_0, its qh then its nibbles; 8 for Q8_0; 35 for Q4_K, its 12 bytes of scales
    and mins then its 128 of nibbles; 43 for Q5_K, its scales, qh and nibbles). The same
    bytes, moved: 8 blocks' worth per block of 8 rows (144, 176, 272, 1152 or 1408)."""
    cols, heads = X8_BLOCK_COLS.get(qtype, 32), X8_HEADS.get(qtype, 1)
    groups, nb, size = n_rows // 8, n_cols // cols, row_bytes(qtype, cols)  # a block's bytes
    blocks = raw.reshape(-1).view(np.uint8).reshape(groups, 8, nb, size)
    out = np.empty((groups, nb, 8 * size), np.uint8)
    # moved as 2- and 4-byte words (a byte-wise transpose is ~4x slower)
    scales = blocks[..., :2 * heads].view(np.uint16).transpose(0, 2, 3, 1)  # (g, block, h, row)
    out[:, :, :16 * heads].view(np.uint16).reshape(groups, nb, heads, 8)[...] = scales
    quants = blocks[..., 2 * heads:].view(np.uint32).transpose(0, 2, 3, 1)  # (g, block, k, row)
    out[:, :, 16 * heads:].view(np.uint32).reshape(groups, nb, -1, 8)[...] = quants
    return out.reshape(-1)


def planar_stride(qtype: T, n_cols: int) -> int:
    """A row's bytes in `planar`'s layout: its quants and scales, padded to 16 bytes."""
    return -(-row_bytes(qtype, n_cols) // 16) * 16


def planar(raw: np.ndarray, qtype: T, n_rows: int, n_cols: int) -> np.ndarray:
    """Q4_0 or Q8_0 rows repacked for matmul.cl's *p kernels (GPUs): each row's quants, block
    after block (32 or 16 bytes), then its f16 scales, then zeros to planar_stride. A work-item's
    16 bytes of quants (half a Q8_0 block, a whole Q4_0 block) are then one aligned load."""
    nb, size = n_cols // 32, row_bytes(qtype, 32)
    blocks = raw.reshape(-1).view(np.uint8).reshape(n_rows, nb, size)
    out = np.zeros((n_rows, planar_stride(qtype, n_cols)), np.uint8)
    out[:, :nb * (size - 2)] = blocks[..., 2:].reshape(n_rows, -1)
    out[:, nb * (size - 2):nb * size].view(np.uint16)[...] = blocks[..., :2].view(np.uint16)[..., 0]
    return out.reshape(-1)


def host_has_vnni(dev: Device) -> bool:
    """Whether the device is PoCL's CPU device on an x86 host with AVX-512 VNNI: matmul.cl's
    VNNI prefill kernels are then built (-DVNNI=1, part of the program cache's key, so a binary
    built here is never loaded on a CPU without the instructions). PoCL only: the kernels use
    clang's target attribute and x86 builtins, which its clang compiles for the host CPU."""
    if (not dev.is_cpu or "Portable Computing Language" not in dev.platform
            or platform.machine() not in ("x86_64", "AMD64")):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return False
    return {"avx512f", "avx512vl", "avx512bw", "avx512_vnni", "f16c"} <= set(flags)


class Kernels:
    def __init__(self, dev: Device, params: Params, programs: ProgramCache):
        self.dev, self.params, self.cl, self.queue = dev, params, dev.cl, dev.queue
        self.vnni = bool(params.UNALIGNED) and host_has_vnni(dev)
        self.mm = programs.get("matmul", {**params.matmul_defines(), "VNNI": int(self.vnni)})
        self.ops = programs.get("ops", params.ops_defines())
        self._kernels: dict[str, Any] = {}
        # X8_TYPES' weights are repacked at upload where the device has the interleaved
        # kernels (AVX2 CPUs: matmul.cl's *_<type>x8) and runs the CPU shape (LWS 1)
        self.interleave = params.LWS == 1 and self._has_kernel(self.mm, "qgemv_q8_0x8")
        # ... and Q4_0/Q8_0 in planes where decode runs the GPU shape (LWS > 1: the *p kernels)
        self.planar = params.LWS > 1
        self.host_pointer_bytes = 0  # weight bytes wrapped in place, not copied
        self.uploaded_bytes = 0  # bytes copied to the device (weights, tables), never freed
        self._q8: tuple[int, Any, Any] = (0, None, None)  # (values it holds, XQ, XD) scratch
        self.scratch_generation = 0  # bumped when the scratch is replaced: recordings go stale
        self.recording: Recording | None = None  # set: launches are captured, not enqueued
        self.last_event: Any = None  # the newest launch's event (benchmarks read its times)

    def k(self, program: Any, name: str) -> Any:
        """A kernel object, made once (pyopencl makes a new one on each attribute access)."""
        if name not in self._kernels:
            self._kernels[name] = self.cl.Kernel(program, name)
        return self._kernels[name]

    def _has_kernel(self, program: Any, name: str) -> bool:
        try:
            self.k(program, name)
            return True
        except self.cl.Error:
            return False

    def launch(self, program: Any, name: str, gsize: tuple, lsize: tuple | None,
               *args: Any) -> None:
        """Enqueue one kernel, or capture it while a decode step is being recorded."""
        if self.recording is None:
            self.last_event = self.k(program, name)(self.queue, gsize, lsize, *args)
        else:  # its own kernel object: a recorded launch keeps its arguments set
            self.recording.add(self.cl.Kernel(program, name), gsize, lsize, args)

    def record(self, steps: Any) -> Recording:
        """The launches `steps()` makes, captured (nothing runs) for Recording.replay."""
        self.recording = Recording(self.cl, self.queue)
        try:
            steps()
            return self.recording
        finally:
            self.recording = None

    # --- memory ---------------------------------------------------------------------------

    def empty(self, nbytes: int) -> Any:
        return self.cl.Buffer(self.dev.context, self.cl.mem_flags.READ_WRITE, max(nbytes, 4))

    def upload(self, array: np.ndarray) -> Any:
        array = np.ascontiguousarray(array)
        mf = self.cl.mem_flags
        self.uploaded_bytes += array.nbytes
        return self.cl.Buffer(self.dev.context, mf.READ_WRITE | mf.COPY_HOST_PTR, hostbuf=array)

    def read(self, buf: Any, shape: tuple[int, ...], dtype: Any = np.float32,
             offset: int = 0) -> np.ndarray:
        out = np.empty(shape, dtype)
        self.cl.enqueue_copy(self.queue, out, buf, src_offset=offset)
        return out

    def weight_buffer(self, raw: np.ndarray, wrap: bool = True) -> Any:
        """Read-only buffer of raw bytes: wraps host memory on unified-memory devices (no copy,
        the pages stay the file's), copies elsewhere, when the driver refuses the pointer, or
        when `wrap` is False (the bytes are a temporary: the buffer does not keep them alive)."""
        mf = self.cl.mem_flags
        raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
        if wrap and self.dev.unified_memory and raw.ctypes.data % 64 == 0:
            try:
                buf = self.cl.Buffer(self.dev.context, mf.READ_ONLY | mf.USE_HOST_PTR, hostbuf=raw)
                self.host_pointer_bytes += raw.nbytes
                return buf
            except (self.cl.Error, TypeError, ValueError):
                pass
        self.uploaded_bytes += raw.nbytes
        return self.cl.Buffer(self.dev.context, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=raw)

    def upload_matrix(self, raw: np.ndarray, qtype: T, shape: tuple[int, ...],
                      repack: bool = True) -> DeviceMatrix:
        """A GGUF weight as it lies in the file, in parts no larger than the device allows.
        X8_TYPES are repacked in groups of 8 rows where the device has the kernels (AVX2
        CPUs), Q4_0/Q8_0 in planes on the GPU shape, unless `repack` is False (benchmarks and
        tests compare the layouts)."""
        if qtype not in FORMATS:
            raise ValueError(f"{qtype.name} weights have no OpenCL kernel "
                             f"(expected one of {', '.join(t.name for t in FORMATS)})")
        n_rows, n_cols = (1, shape[0]) if len(shape) == 1 else shape
        if n_cols % 32:
            raise ValueError(f"row length {n_cols} is not a multiple of 32")
        per_row = row_bytes(qtype, n_cols)
        flat = raw.reshape(-1).view(np.uint8)
        m = DeviceMatrix(qtype, n_rows, n_cols, per_row)
        if repack and qtype in X8_TYPES and self.interleave and n_rows % 8 == 0:
            m.layout, flat = X8, interleave(flat, qtype, n_rows, n_cols)
        elif repack and qtype in PLANAR_TYPES and self.planar:
            m.layout, m.row_bytes = PLANAR, planar_stride(qtype, n_cols)
            flat = planar(flat, qtype, n_rows, n_cols)
        rows_per_part = max(1, self.dev.max_alloc // m.row_bytes)
        if m.layout == X8:
            rows_per_part = max(8, rows_per_part // 8 * 8)
        stride = m.row_bytes
        for r0 in range(0, n_rows, rows_per_part):
            n = min(rows_per_part, n_rows - r0)
            m.parts.append((r0, n, self.weight_buffer(flat[r0 * stride:(r0 + n) * stride],
                                                      wrap=m.layout == FILE)))
        return m

    # --- kernels --------------------------------------------------------------------------

    def _q8_scratch(self, n: int) -> Q8:
        if n > self._q8[0]:
            self._q8 = (n, self.empty(n), self.empty(8 * (n // 32)))  # scales, then sums
            self.scratch_generation += 1
        return self._q8[1], self._q8[2]

    def quantize_q8(self, x: Any, n_cols: int, n_tok: int) -> Q8:
        """x (n_tok, n_cols) rounded to Q8_0 blocks in a reused scratch: (int8 values, float32
        scale per 32), what the q* kernels of quantized weights read (numpy: q8_activations).
        Valid until the next quantization: the in-order queue runs the launches in turn."""
        xq, xd = self._q8_scratch(n_cols * n_tok)
        self.launch(self.ops, "quantize_q8", (n_cols // 32, n_tok), None, x, xq, xd,
                    np.int32(n_cols))
        return xq, xd

    def _qmatmul(self, w: DeviceMatrix, x: Any, y: Any, n_tok: int, stride: int,
                 y_off: int | PerStep, accumulate: bool, q8: Q8 | None) -> None:
        """matmul() for quantized weights: int8 activations, integer dot products per block.
        Decode: LWS work-items a row (GPUs) or one (CPUs); prefill: a token tile per row."""
        p, name = self.params, w.suffix
        xq, xd = q8 or self.quantize_q8(x, w.n_cols, n_tok)
        cols, acc = np.int32(w.n_cols), np.int32(accumulate)
        for r0, n, buf in w.parts:
            rows, off = math.ceil(n / p.RPW) * p.RPW, i32(y_off + r0)
            if w.layout == X8:  # 8 rows a work-item (x TILE_N or 8 tokens in prefill)
                groups = (math.ceil(n / 8 / X8_GROUP) * X8_GROUP,)
                if n_tok == 1:
                    self.launch(self.mm, f"qgemv_{name}", groups, (X8_GROUP,), buf, xq, xd, y,
                                cols, np.int32(n), off, acc)
                elif self.vnni:
                    self.launch(self.mm, f"qgemm8_{name}", (*groups, math.ceil(n_tok / 8)),
                                (X8_GROUP, 1), buf, xq, xd, y, cols, np.int32(n),
                                np.int32(n_tok), np.int32(stride), off, acc)
                else:
                    tile = 8 if p.TT == 8 else 4  # matmul.cl's TILE_N
                    self.launch(self.mm, f"qgemm_{name}", (*groups, math.ceil(n_tok / tile)),
                                (X8_GROUP, 1), buf, xq, xd, y, cols, np.int32(n),
                                np.int32(n_tok), np.int32(stride), off, acc)
            elif n_tok == 1 and p.LWS > 1:
                self.launch(self.mm, f"qmatmul_{name}_vec", (rows * p.LWS,), (p.RPW * p.LWS,),
                            buf, xq, xd, y, cols, np.int32(n), np.int32(1),
                            np.int32(w.row_bytes), np.int32(stride), off, acc)
            elif n_tok == 1:  # two rows a work-item
                self.launch(self.mm, f"qgemv_{name}", (pairs(n, p.RPW),), (p.RPW,), buf, xq, xd,
                            y, cols, np.int32(n), np.int32(w.row_bytes), off, acc)
            elif self.vnni and w.layout == FILE and w.qtype in VNNI_TYPES:  # 8 rows x 8 tokens
                tiles = (math.ceil(n / 32) * 4, math.ceil(n_tok / 8))
                self.launch(self.mm, f"qgemm8_{name}", tiles, (4, 1), buf, xq, xd, y, cols,
                            np.int32(n), np.int32(n_tok), np.int32(w.row_bytes),
                            np.int32(stride), off, acc)
            else:
                tile = 8 if p.TT == 8 else 4  # matmul.cl's TILE_N
                self.launch(self.mm, f"qgemm_{name}", (rows, math.ceil(n_tok / tile)),
                            (p.RPW, 1), buf, xq, xd, y, cols, np.int32(n), np.int32(n_tok),
                            np.int32(w.row_bytes), np.int32(stride), off, acc)

    def matmul(self, w: DeviceMatrix, x: Any, y: Any, n_tok: int, *, y_stride: int | None = None,
               y_off: int | PerStep = 0, accumulate: bool = False,
               q8: Q8 | None = None) -> None:
        """y[t, :] (+)= W x[t] for t < n_tok; x is (n_tok, n_cols), y rows of y_stride.
        Like llama.cpp, quantized weights multiply x rounded to Q8_0 blocks (_qmatmul): `q8`,
        when given, is x already rounded (rms_norm's or quantize_q8's), else this rounds it."""
        p = self.params
        stride = w.n_rows if y_stride is None else y_stride
        if w.qtype in Q8_ACTIVATION_TYPES:
            self._qmatmul(w, x, y, n_tok, stride, y_off, accumulate, q8)
            return
        fmt, cols, acc = FORMATS[w.qtype], np.int32(w.n_cols), np.int32(accumulate)
        for r0, n, buf in w.parts:
            rows, off = math.ceil(n / p.RPW) * p.RPW, i32(y_off + r0)
            if n_tok == 1 and p.LWS == 1:  # CPU-style: one work-item per row
                self.launch(self.mm, f"gemv_{fmt}", (rows,), (p.RPW,), buf, x, y, cols,
                            np.int32(n), np.int32(w.row_bytes), off, acc)
            elif p.LWS == 1 and p.TT in (4, 8):  # CPU-style prefill: a token tile a work-item
                self.launch(self.mm, f"gemm_{fmt}", (rows, math.ceil(n_tok / p.TT)), (p.RPW, 1),
                            buf, x, y, cols, np.int32(n), np.int32(n_tok),
                            np.int32(w.row_bytes), np.int32(stride), off, acc)
            else:
                nt = 1 if n_tok == 1 else p.TT
                self.launch(self.mm, f"matmul_{fmt}_{'vec' if nt == 1 else 'mat'}",
                            (rows * p.LWS, math.ceil(n_tok / nt)), (p.RPW * p.LWS, 1), buf, x, y,
                            cols, np.int32(n), np.int32(n_tok), np.int32(w.row_bytes),
                            np.int32(stride), off, acc)

    def _fusable(self, *ws: DeviceMatrix) -> bool:
        """Decode's fused kernels need the CPU shape (LWS 1), one type and width, one buffer."""
        w0 = ws[0]
        return self.params.LWS == 1 and all(
            len(w.parts) == 1 and w.qtype == w0.qtype and w.n_cols == w0.n_cols
            and w.layout == w0.layout for w in ws)

    def matmul_qkv(self, wq: DeviceMatrix, wk: DeviceMatrix, wv: DeviceMatrix, x: Any, q: Any,
                   kc: Any, vc: Any, kv_off: int | PerStep, q8: Q8 | None = None) -> None:
        """One token's Q, K and V projections: q = Wq x, and K, V into the caches at kv_off
        (floats); one launch where the three matrices allow it (see _fusable), else three."""
        odd = wq.qtype in Q8_ACTIVATION_TYPES and (wq.n_rows % 2 or wk.n_rows % 2)
        if wk.n_rows != wv.n_rows or odd or not self._fusable(wq, wk, wv):
            q8 = q8 or self.q8_for(x, wq.n_cols, 1, wq, wk, wv)
            self.matmul(wq, x, q, 1, q8=q8)
            self.matmul(wk, x, kc, 1, y_off=kv_off, q8=q8)
            self.matmul(wv, x, vc, 1, y_off=kv_off, q8=q8)
            return
        rpw, rows = self.params.RPW, wq.n_rows + 2 * wk.n_rows
        weights = (wq.parts[0][2], wk.parts[0][2], wv.parts[0][2])
        shape = (np.int32(wq.n_cols), np.int32(wq.n_rows), np.int32(wk.n_rows),
                 np.int32(wq.row_bytes), i32(kv_off))
        gsize, fmt = (math.ceil(rows / rpw) * rpw,), wq.suffix
        if wq.layout == X8:
            xq, xd = q8 or self.quantize_q8(x, wq.n_cols, 1)
            self.launch(self.mm, f"qgemv_qkv_{fmt}", (math.ceil(rows / 8 / X8_GROUP) * X8_GROUP,),
                        (X8_GROUP,), *weights, xq, xd, q, kc, vc, *shape[:3], shape[4])
        elif wq.qtype in Q8_ACTIVATION_TYPES:
            xq, xd = q8 or self.quantize_q8(x, wq.n_cols, 1)
            self.launch(self.mm, f"qgemv_qkv_{fmt}", (pairs(rows, rpw),), (rpw,), *weights, xq,
                        xd, q, kc, vc, *shape)
        else:
            self.launch(self.mm, f"gemv_qkv_{fmt}", gsize, (rpw,), *weights, x, q, kc, vc, *shape)

    def matmul_glu(self, wg: DeviceMatrix, wu: DeviceMatrix, x: Any, gate: Any, up: Any,
                   q8: Q8 | None = None) -> None:
        """One token's SwiGLU: gate = silu(Wg x) * (Wu x), in one launch where the matrices
        allow it, else the two products and swiglu (`up` is then the scratch)."""
        if wg.n_rows != wu.n_rows or not self._fusable(wg, wu):
            q8 = q8 or self.q8_for(x, wg.n_cols, 1, wg, wu)
            self.matmul(wg, x, gate, 1, q8=q8)
            self.matmul(wu, x, up, 1, q8=q8)
            self.swiglu(gate, up, wg.n_rows)
            return
        rpw = self.params.RPW
        gsize, fmt = (math.ceil(wg.n_rows / rpw) * rpw,), wg.suffix
        shape = (np.int32(wg.n_cols), np.int32(wg.n_rows), np.int32(wg.row_bytes))
        if wg.layout == X8:
            xq, xd = q8 or self.quantize_q8(x, wg.n_cols, 1)
            self.launch(self.mm, f"qgemv_glu_{fmt}",
                        (math.ceil(wg.n_rows / 8 / X8_GROUP) * X8_GROUP,), (X8_GROUP,),
                        wg.parts[0][2], wu.parts[0][2], xq, xd, gate, *shape[:2])
        elif wg.qtype in Q8_ACTIVATION_TYPES:
            xq, xd = q8 or self.quantize_q8(x, wg.n_cols, 1)
            self.launch(self.mm, f"qgemv_glu_{fmt}", (pairs(wg.n_rows, rpw),), (rpw,),
                        wg.parts[0][2], wu.parts[0][2], xq, xd, gate, *shape)
        else:
            self.launch(self.mm, f"gemv_glu_{fmt}", gsize, (rpw,), wg.parts[0][2],
                        wu.parts[0][2], x, gate, *shape)

    def get_rows(self, w: DeviceMatrix, tokens: Any, out: Any, n_tok: int) -> None:
        """out[t] = float32 row tokens[t] of w (embedding lookup); tokens int32 on the device."""
        if len(w.parts) != 1:  # a split table: look up on the host rows per part (rare)
            raise ValueError("embedding lookup needs the table in one buffer")
        if w.layout == X8:
            self.launch(self.mm, f"get_rows_{w.suffix}", (w.n_cols // 32, n_tok), None,
                        w.parts[0][2], tokens, out, np.int32(w.n_cols))
            return
        self.launch(self.mm, f"get_rows_{w.suffix}", (w.n_cols // 32, n_tok), None,
                    w.parts[0][2], tokens, out, np.int32(w.n_cols), np.int32(w.row_bytes))

    def q8_for(self, x: Any, n_cols: int, n_tok: int, *ws: DeviceMatrix) -> Q8 | None:
        """x rounded to Q8_0 once for several products that read it, if one of them wants it."""
        if any(w.qtype in Q8_ACTIVATION_TYPES for w in ws):
            return self.quantize_q8(x, n_cols, n_tok)
        return None

    def rms_norm(self, x: Any, w: Any, out: Any, n: int, n_rows: int, eps: float, *,
                 q8: bool = False) -> Q8 | None:
        """out = RMSNorm(x) · w per row; with q8 also out rounded to Q8_0 blocks in the same
        launch, returned as quantize_q8 returns it (for the quantized products that read out)."""
        wg = self.params.WG
        if q8 and n % 32 == 0:
            xq, xd = self._q8_scratch(n * n_rows)
            self.launch(self.ops, "rms_norm_q8", (wg, n_rows), (wg, 1), x, w, out, xq, xd,
                        np.int32(n), np.float32(eps))
            return xq, xd
        self.launch(self.ops, "rms_norm", (wg, n_rows), (wg, 1), x, w, out, np.int32(n),
                    np.float32(eps))
        return None

    def rope(self, x: Any, off: int | PerStep, cos: Any, sin: Any, pos0: int | PerStep,
             n_tok: int, n_heads: int, head_dim: int, rope_dim: int, neox: bool) -> None:
        self.launch(self.ops, "rope", (rope_dim // 2, n_heads, n_tok), None, x, i32(off), cos,
                    sin, i32(pos0), np.int32(head_dim), np.int32(rope_dim), np.int32(neox))

    def add_bias(self, x: Any, off: int | PerStep, bias: Any, n: int, n_tok: int) -> None:
        self.launch(self.ops, "add_bias", (n, n_tok), None, x, i32(off), bias, np.int32(n))

    def swiglu(self, gate: Any, up: Any, n: int) -> None:
        if n % 8 == 0:
            self.launch(self.ops, "swiglu8", (n // 8,), None, gate, up)
        else:
            self.launch(self.ops, "swiglu", (n,), None, gate, up)

    def attention_splits(self, n_keys: int) -> int:
        return math.ceil(n_keys / self.params.SPLIT)

    def attention(self, q: Any, kc: Any, vc: Any, out: Any, part: Any, n_tok: int, n_heads: int,
                  n_kv: int, head_dim: int, pos0: int | PerStep, *,
                  split: bool | None = None, q8: bool = False) -> Q8 | None:
        """out (n_tok, n_heads * head_dim) = causal softmax(q k^T / sqrt(d)) v over the cache
        positions < pos0 + t + 1. Decode (or split=True) spreads the keys over work-groups
        (`part` holds n_tok * n_heads * splits * (head_dim + 2) floats); prefill stages keys
        in local memory for a tile of queries. With `q8`, where the launch can (CPUs, one split
        of the keys), out comes rounded to Q8_0 too, returned as quantize_q8 returns it."""
        scale = np.float32(1.0 / math.sqrt(head_dim))
        heads = (np.int32(n_heads), np.int32(n_kv), np.int32(head_dim))
        if not (n_tok == 1 if split is None else split):
            wg = self.params.WG
            cpu16 = self.params.LWS == 1 and head_dim % 16 == 0  # the kernel's float16 rows
            self.launch(self.ops, "attn_prefill16" if cpu16 else "attn_prefill",
                        (wg * math.ceil(n_tok / wg), n_heads), (wg, 1),
                        q, kc, vc, out, np.int32(n_tok), *heads, i32(pos0), scale)
            return None
        # a recorded step keeps this split count: Recording users re-record when it changes
        wg, n_split = self.params.WG, self.attention_splits(now(pos0) + n_tok)
        n_q = n_tok * n_heads
        if self.params.LWS == 1 and head_dim % 16 == 0:  # CPUs: a work-item a row and split
            to_q8 = q8 and n_split == 1 and head_dim % 32 == 0
            xq, xd = self._q8_scratch(n_q * head_dim) if to_q8 else (part, part)
            self.launch(self.ops, "attn_partial_row", (n_q, n_split), (1, 1), q, kc, vc, part,
                        out, xq, xd, *heads, i32(pos0), scale, np.int32(to_q8))
            if n_split > 1:
                self.launch(self.ops, "attn_combine", (head_dim, n_q), None, part, out,
                            np.int32(head_dim), np.int32(n_split))
            return (xq, xd) if to_q8 else None
        self.launch(self.ops, "attn_partial", (wg * n_q, n_split), (wg, 1), q, kc, vc, part,
                    *heads, i32(pos0), scale)
        self.launch(self.ops, "attn_combine", (head_dim, n_q), None, part, out,
                    np.int32(head_dim), np.int32(n_split))
        return None

    def softmax(self, x: Any, n: int, n_rows: int) -> None:
        wg = self.params.WG
        self.launch(self.ops, "softmax_rows", (wg, n_rows), (wg, 1), x, np.int32(n))

    def argmax(self, x: Any, out: Any, n: int, n_rows: int) -> None:
        wg = self.params.WG
        self.launch(self.ops, "argmax_rows", (wg, n_rows), (wg, 1), x, out, np.int32(n))

    def top_k(self, x: Any, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k largest of x[:n] (k ≤ 64), largest first: (values, indices) on the host."""
        if not 1 <= k <= min(64, n):
            raise ValueError(f"top-k needs 1 ≤ k ≤ {min(64, n)}, got {k}")
        vals, ids = self.empty(4 * k), self.empty(4 * k)
        self.launch(self.ops, "topk", (16,), (16,), x, np.int32(n), np.int32(k), vals, ids)
        return self.read(vals, (k,)), self.read(ids, (k,), np.int32)
