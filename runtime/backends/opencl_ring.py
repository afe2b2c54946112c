"""Streamed units on an OpenCL device: a ring of device buffers that the next streamed unit's
GGUF blocks are uploaded into while the current unit computes.

The memory plan (`backend="opencl"`) says which units (layers, the output head) stream. Each
ring slot is one or more device buffers (each within the device's largest allocation) sized for
the largest of them; a unit's tensors lie in a slot at aligned offsets and are handed to the
kernels as sub-buffers, so the matmul kernels are the resident weights' own.

The forward pass brackets each streamed unit with `enter` and `leave`, as the numpy backend's
WeightStore does. `enter` waits for the unit's upload and schedules the next streamed unit's
into the least recently used other slot; `leave` puts a marker on the compute queue. An upload
runs on a background thread with its own command queue: it waits for the marker of the slot's
previous unit (the kernels reading the slot are done), then reads the blocks from the model file
with `preadv` into one reused host staging buffer (kernel read-ahead doubled: FADV_SEQUENTIAL),
copies each piece to the slot (blocking on the upload queue, which releases the GIL) and drops
its pages from the page cache (POSIX_FADV_DONTNEED: a cgroup charges the page cache), so the
host holds the staging buffer, not layers.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from runtime.backends.opencl_kernels import FORMATS, DeviceMatrix, Kernels
from runtime.backends.weight_stream import OpenFiles, file_span
from runtime.errors import ModelError
from runtime.memory_plan import RING_SLOTS, SLOT_ALIGN, STAGING_BYTES, Plan
from runtime.model_file import ModelSource, TensorRef
from runtime.quant import dequantize, row_bytes

FOLIO = 2 << 20  # the largest page-cache folio to expect (a PMD on x86-64 and arm64 4K)


class DeviceRing:
    """Ring slots for a plan's streamed units; `enter(unit)` gives that unit's matrices."""

    def __init__(self, kern: Kernels, source: ModelSource, plan: Plan, *,
                 slots: int = RING_SLOTS, staging: int = STAGING_BYTES):
        self.kern, self.cl, self.source = kern, kern.cl, source
        self.units = {i: u.tensors for i, u in enumerate(plan.units) if u.tier == "stream"}
        self.order = sorted(self.units)
        dev = kern.dev
        self.align = max(64, int(dev.device.mem_base_addr_align) // 8)
        if self.align > SLOT_ALIGN:
            raise ModelError(f"{dev.name} aligns sub-buffers to {self.align} bytes, more than "
                             f"the memory plan allows for ({SLOT_ALIGN}); expected a budget "
                             "that keeps every layer resident")
        # where each tensor lies in a slot: (buffer index, byte offset); buffer sizes are the
        # largest any unit needs, so every unit fits every slot
        self.layout = {u: self._pack(u, dev.max_alloc) for u in self.order}
        sizes: list[int] = []
        for places in self.layout.values():
            for buf, off, ref in places.values():
                sizes += [0] * (buf + 1 - len(sizes))
                sizes[buf] = max(sizes[buf], off + ref.nbytes)
        self.slot_bytes = sum(sizes)
        self.slots = [[kern.empty(n) for n in sizes] for _ in range(slots)]
        self.holder: list[int | None] = [None] * slots  # the unit each slot holds (or gets)
        self.used = [0] * slots  # when each slot was last entered
        self.free_after: list[Any] = [None] * slots  # marker: the slot's kernels are done
        self.current: int | None = None
        self.pending: dict[int, Future[None]] = {}
        self.matrices: dict[tuple[int, int], dict[str, DeviceMatrix]] = {}
        self.upload_queue = self.cl.CommandQueue(dev.context, dev.device)
        self.staging = np.empty(staging, np.uint8)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="claw-ring")
        self.reads = 0  # bytes read from the file and uploaded so far
        self.uploads = 0  # units uploaded so far
        self.files = OpenFiles()
        self._dropped: list[tuple[str, int, int]] = []  # file ranges the last upload read
        self._clock = 0

    @property
    def nbytes(self) -> int:
        return self.slot_bytes * len(self.slots)

    def _pack(self, unit: int, max_alloc: int) -> dict[str, tuple[int, int, TensorRef]]:
        """Place the unit's tensors in order into buffers of at most max_alloc bytes."""
        places, buf, end = {}, 0, 0
        for name in self.units[unit]:
            ref = self.source.tensors[name]
            if ref.qtype not in FORMATS or ref.shape[1] % 32:
                raise ModelError(f"{name} is {ref.qtype.name} with rows of {ref.shape[1]}, which "
                                 "the OpenCL kernels cannot read (expected one of "
                                 f"{', '.join(t.name for t in FORMATS)}, rows a multiple of "
                                 "32); use --backend numpy")
            if ref.nbytes > max_alloc:
                raise ModelError(f"{name} ({ref.nbytes:,} bytes) is larger than the device's "
                                 f"largest buffer ({max_alloc:,}): streaming it is not "
                                 "supported yet; expected a budget that keeps it resident, or "
                                 "--backend numpy")
            off = -(-end // self.align) * self.align
            if off + ref.nbytes > max_alloc:
                buf, off = buf + 1, 0
            places[name], end = (buf, off, ref), off + ref.nbytes
        return places

    # -- the forward pass's side ------------------------------------------------------------
    def enter(self, unit: int) -> dict[str, DeviceMatrix]:
        """Unit `unit` is about to run: wait for its upload (starting it if nobody has), start
        the next streamed unit's, and give the unit's matrices by tensor name."""
        if unit not in self.holder:
            self._schedule(unit)
        pending = self.pending.pop(unit, None)
        if pending is not None:
            pending.result()
        slot = self.holder.index(unit)
        self.current, self._clock = slot, self._clock + 1
        self.used[slot] = self._clock
        later = [u for u in self.order if u > unit] or self.order
        if later[0] != unit:
            self._schedule(later[0])
        return self.matrices[slot, unit]

    def leave(self, unit: int) -> None:
        """Unit `unit`'s kernels are enqueued: its slot is free once they have run."""
        self.free_after[self.holder.index(unit)] = self.cl.enqueue_marker(self.kern.queue)

    def _schedule(self, unit: int) -> None:
        if unit in self.holder:
            return
        free = [s for s in range(len(self.slots)) if s != self.current]
        slot = min(free, key=lambda s: self.used[s])
        if self.holder[slot] is not None:
            self.pending.pop(self.holder[slot], None)  # not entered yet: it reloads when it is
        self.holder[slot] = unit
        if (slot, unit) not in self.matrices:
            self.matrices[slot, unit] = self._views(slot, unit)
        self.pending[unit] = self.pool.submit(self._upload, unit, slot, self.free_after[slot])

    def _views(self, slot: int, unit: int) -> dict[str, DeviceMatrix]:
        out = {}
        for name, (buf, off, ref) in self.layout[unit].items():
            n_rows, n_cols = ref.shape
            region = self.slots[slot][buf].get_sub_region(off, ref.nbytes)
            out[name] = DeviceMatrix(ref.qtype, n_rows, n_cols, row_bytes(ref.qtype, n_cols),
                                     [(0, n_rows, region)])
        return out

    # -- the upload thread ------------------------------------------------------------------
    def _upload(self, unit: int, slot: int, after: Any) -> None:
        if after is not None:
            after.wait()
        # the last unit's pages again, its span rounded out to FOLIO: FADV_DONTNEED keeps a
        # large folio (ext4 on Linux 6.x) that crosses its range's ends, which left ~2 MiB of
        # every layer cached (mapped pages, e.g. a neighbouring resident unit's, stay anyway)
        for path, start, end in self._dropped:
            self._drop(self._fd(path), start, end)
        self._dropped = []
        cl, view = self.cl, memoryview(self.staging)
        for buf, off, ref in self.layout[unit].values():
            dst = self.slots[slot][buf]
            span = file_span(ref)
            if span is None:  # not a mapped file (e.g. converted in memory): copy as it lies
                flat = np.ascontiguousarray(ref.raw).reshape(-1).view(np.uint8)
                cl.enqueue_copy(self.upload_queue, dst, flat, dst_offset=off, is_blocking=True)
                self.reads += ref.nbytes
                continue
            path, file_off, _, length = span
            fd, done = self._fd(path), 0
            while done < length:
                n = os.preadv(fd, [view[:min(len(view), length - done)]], file_off + done)
                if n <= 0:
                    raise ModelError(f"{path}: the file ends inside {ref.name} (expected "
                                     f"{length} bytes at offset {file_off})")
                cl.enqueue_copy(self.upload_queue, dst, self.staging[:n], dst_offset=off + done,
                                is_blocking=True)
                os.posix_fadvise(fd, file_off + done, n, os.POSIX_FADV_DONTNEED)
                done += n
            self._dropped.append((path, file_off, file_off + length))
            self.reads += done
        self.uploads += 1

    # -- small reads beside the ring ----------------------------------------------------------
    def rows(self, ref: TensorRef, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor as float32, read from the file, not through the map:
        a fault on the map reads ahead around it (megabytes per norm vector or embedding row
        with large folios), which streamed layers' neighbours would then keep cached."""
        span = file_span(ref)
        if span is None:
            return ref.rows(start, stop) if len(ref.shape) == 2 else ref.to_float32()
        path, file_off, _, _ = span
        n_cols = ref.shape[-1]
        per_row = row_bytes(ref.qtype, n_cols)
        fd, off = self._fd(path, small=True), file_off + start * per_row
        length = (stop - start) * per_row
        raw = os.pread(fd, length, off)
        if len(raw) != length:
            raise ModelError(f"{path}: the file ends inside {ref.name} (expected {length} bytes "
                             f"at offset {off})")
        self._drop(fd, off, off + length)
        return dequantize(np.frombuffer(raw, np.uint8), ref.qtype, (stop - start, n_cols)).copy()

    @staticmethod
    def _drop(fd: int, start: int, end: int) -> None:
        start, end = start - start % FOLIO, -(-end // FOLIO) * FOLIO
        os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)

    def _fd(self, path: str, small: bool = False) -> int:
        """The upload's descriptor: the kernel reads ahead while a slot is copied (1.8x faster
        than reading only what is asked, here; pages read ahead past a DONTNEED go with the next
        unit's). `small` reads (a norm, an embedding row) get one that reads only what is asked."""
        return self.files.get(path, os.POSIX_FADV_RANDOM if small else os.POSIX_FADV_SEQUENTIAL)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.files.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit there is nothing to close
            self.close()
