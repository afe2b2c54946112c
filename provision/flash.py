"""`claw flash`: stream an image (raw, .zst, .xz, .gz) onto a disk, writing only the ranges
that hold data, then read every written range back and compare its SHA-256.

Writing holes is what makes `dd` slow: a 4 GiB image with 1 GiB of data is 3 GiB of zeros.
The ranges come from the image's block map (IMAGE.bmap, see provision.blockmap), else from
SEEK_DATA/SEEK_HOLE on a raw image, else (a compressed image with no map) everything. The
first MiB (partition table, boot sectors, filesystem superblocks) and, for GPT, the last MiB
(backup table) are always written, so stale tables on the target never survive.

With a block map, every mapped range of the (decompressed) image is hashed against the map
before the target is opened: a damaged image or another image's map is refused with the
target untouched, never found halfway through a write.

Block devices are written with O_DIRECT (no page cache to flush, honest progress) and read
back with O_DIRECT, so verification reads the device, not our own cached writes.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import mmap
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from provision.blockmap import BlockMap, Range, data_ranges, load_blockmap, looks_like_blockmap
from provision.errors import BadInput, ClawError
from provision.flash_target import Target, check_target

MIB = 1 << 20
HEADER = MIB
CHUNK = 8 * MIB
ALIGN = 4096
MAGIC = {b"\x28\xb5\x2f\xfd": "zst", b"\xfd7zXZ\x00": "xz", b"\x1f\x8b": "gz"}

Progress = Callable[[str, int, int], None]  # phase (check/write/verify), done bytes, total


class FlashInterrupted(ClawError):
    """Ctrl-C or SIGTERM mid-write (exit 1)."""


class VerifyFailed(ClawError):
    """Read-back differs from the image (exit 1)."""


@dataclass
class FlashResult:
    image_size: int
    written_bytes: int
    ranges: int
    map_source: str  # "bmap", "seek", "whole"
    compression: str
    write_s: float
    verify_s: float
    target: str


def compression_of(image: Path) -> str:
    """raw, zst, xz or gz, by magic bytes; a block map or unreadable file is bad input."""
    try:
        with open(image, "rb") as f:
            head = f.read(4096)
    except FileNotFoundError:
        raise BadInput(f"{image}: no such image") from None
    except IsADirectoryError:
        raise BadInput(f"{image}: is a directory, not an image") from None
    except OSError as exc:
        raise BadInput(f"{image}: cannot read the image ({exc.strerror})") from None
    if looks_like_blockmap(head):
        raise BadInput(f"{image}: is a block map, not an image (pass the image; its map is "
                       "found beside it, or give it with --bmap)")
    for magic, kind in MAGIC.items():
        if head.startswith(magic):
            return kind
    return "raw"


def open_stream(image: Path, kind: str) -> BinaryIO:
    if kind == "zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(image, "rb"), closefd=True,
                                                          read_size=CHUNK)
    if kind == "xz":
        return lzma.open(image, "rb")
    if kind == "gz":
        return gzip.open(image, "rb")
    return open(image, "rb")


def find_blockmap(image: Path, kind: str) -> Path | None:
    """IMAGE.bmap beside the image; for IMAGE.img.zst also IMAGE.img.bmap."""
    candidates = [image.with_name(image.name + ".bmap")]
    if kind != "raw" and image.suffix:
        candidates.append(image.with_name(image.stem + ".bmap"))
    return next((c for c in candidates if c.is_file()), None)


def _vli(buf: bytes, pos: int) -> tuple[int, int]:
    """xz's variable-length integer at pos: (value, next pos)."""
    value = shift = 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _xz_size(image: Path) -> int:
    """Sum of the uncompressed sizes in a single-stream .xz's index (-1: can't tell)."""
    with open(image, "rb") as f:
        f.seek(-12, os.SEEK_END)
        footer = f.read(12)
        if footer[10:12] != b"YZ":
            return -1
        index_size = (int.from_bytes(footer[4:8], "little") + 1) * 4
        f.seek(-12 - index_size, os.SEEK_END)
        index = f.read(index_size)
    if not index or index[0] != 0:
        return -1
    count, pos = _vli(index, 1)
    total = 0
    for _ in range(count):
        _, pos = _vli(index, pos)  # unpadded (compressed) size
        size, pos = _vli(index, pos)
        total += size
    return total


def recorded_size(image: Path, kind: str) -> int:
    """The uncompressed size a compressed file records about itself, without decompressing:
    zstd's frame header (when the writer knew it), xz's index; -1 when it records none."""
    try:
        if kind == "zst":
            import zstandard

            with open(image, "rb") as f:
                return zstandard.frame_content_size(f.read(18))
        if kind == "xz":
            return _xz_size(image)
    except (OSError, IndexError, ValueError):
        return -1
    return -1


def stream_size(image: Path, kind: str) -> int:
    """The uncompressed size of an image with no map: zstd frames often record it; otherwise
    one decompression pass counts it (the price of flashing without a map)."""
    if kind == "raw":
        return image.stat().st_size
    size = recorded_size(image, kind)
    if size >= 0:
        return size
    total = 0
    with open_stream(image, kind) as stream:
        while chunk := stream.read(CHUNK):
            total += len(chunk)
    return total


def _subtract(start: int, end: int, covered: list[Range]) -> list[tuple[int, int]]:
    pieces = [(start, end)]
    for r in covered:
        pieces = [p for s, e in pieces for p in ((s, min(e, r.start)), (max(s, r.end), e))
                  if p[1] > p[0]]
    return pieces


def plan(bmap: BlockMap, gpt: bool) -> list[Range]:
    """The map's ranges plus the always-written header (and GPT backup) regions."""
    size = bmap.image_size
    forced = [(0, min(HEADER, size))] + ([(max(size - HEADER, 0), size)] if gpt else [])
    extra = [Range(s, e - s) for fs, fe in forced for s, e in _subtract(fs, fe, bmap.ranges)]
    merged = sorted(set(bmap.ranges) | set(extra), key=lambda r: r.start)
    return merged


def _check_map(image: Path, kind: str, bmap: BlockMap, bmap_path: Path) -> None:
    """Refuse (nothing written) a map whose size cannot be this image's: cheap, from what the
    file records about itself; the contents are checked by `_precheck_ranges`."""
    size = image.stat().st_size if kind == "raw" else recorded_size(image, kind)
    if kind == "gz":  # gzip records the size modulo 2**32 only
        with open(image, "rb") as f:
            f.seek(-4, os.SEEK_END)
            if int.from_bytes(f.read(4), "little") != bmap.image_size % (1 << 32):
                raise BadInput(f"{bmap_path}: the map is for a {bmap.image_size}-byte image, "
                               f"which {image} does not hold; it is not this image's map")
    if size >= 0 and size != bmap.image_size:
        raise BadInput(f"{bmap_path}: the map is for a {bmap.image_size}-byte image but "
                       f"{image} is {size} bytes; it is not this image's map")


def _stream_errors() -> tuple[type[BaseException], ...]:
    """What a damaged or truncated compressed stream raises while being read."""
    errors: tuple[type[BaseException], ...] = (lzma.LZMAError, gzip.BadGzipFile, EOFError)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def _precheck_ranges(image: Path, kind: str, bmap: BlockMap, bmap_path: Path,
                     progress: Progress) -> None:
    """Hash every mapped range of the (decompressed) image against the map before the target
    is opened, so a damaged image or another image's map is refused with the target untouched.
    One extra read (and decompression) pass: zstd runs at ~1 GB/s and xz at ~100 MB/s, both
    well above what a card takes, and a refusal halfway through a write leaves a dead card."""
    ranges = [r for r in bmap.ranges if r.sha256]
    if not ranges:
        return
    buf = bytearray(CHUNK)
    total, done, pos = sum(r.length for r in ranges), 0, 0
    try:
        with open_stream(image, kind) as stream:
            for r in ranges:
                if kind == "raw":
                    stream.seek(r.start)
                    pos = r.start
                digest = hashlib.sha256()
                while pos < r.end:
                    want = min(CHUNK, (r.start if pos < r.start else r.end) - pos)
                    n = stream.readinto(memoryview(buf)[:want])
                    if not n:
                        raise BadInput(f"{image}: ends at byte {pos}, before the "
                                       f"{bmap.image_size} bytes {bmap_path} maps; it is "
                                       "truncated or not this map's image")
                    if pos >= r.start:
                        digest.update(memoryview(buf)[:n])
                        done += n
                        progress("check", done, total)
                    pos += n
                if digest.hexdigest() != r.sha256:
                    raise BadInput(f"{bmap_path}: SHA-256 of bytes {r.start}..{r.end} does not "
                                   f"match {image}; it is not this image's map, or the image "
                                   "is damaged (nothing written)")
    except _stream_errors() as exc:
        raise BadInput(f"{image}: damaged {kind} data near byte {pos} ({exc}); "
                       "nothing written") from None


def _aligned_buffer(size: int) -> mmap.mmap:
    return mmap.mmap(-1, size)  # page-aligned: what O_DIRECT needs


class _Writer:
    """Writes at offsets: O_DIRECT for aligned pieces of a block device, buffered otherwise."""

    def __init__(self, target: Target, image_size: int):
        flags = os.O_RDWR | os.O_CLOEXEC
        if target.is_block:
            self.fd = os.open(target.path, flags | os.O_EXCL)
        else:
            self.fd = os.open(target.path, flags | os.O_CREAT, 0o644)
            os.ftruncate(self.fd, 0)  # the file becomes exactly the image: holes read as zeros
            os.ftruncate(self.fd, image_size)
        self.direct = None
        if target.is_block:
            try:
                self.direct = os.open(target.path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
            except OSError:
                self.direct = None

    def write(self, buf: memoryview, offset: int) -> None:
        fd = self.direct if (self.direct is not None and offset % ALIGN == 0
                             and len(buf) % 512 == 0) else self.fd
        while len(buf):
            n = os.pwrite(fd, buf, offset)
            buf, offset = buf[n:], offset + n

    def read(self, buf: mmap.mmap, length: int, offset: int) -> memoryview:
        view = memoryview(buf)[:length]
        fd = self.direct if (self.direct is not None and offset % ALIGN == 0
                             and length % 512 == 0) else self.fd
        got = 0
        while got < length:
            n = os.preadv(fd, [view[got:]], offset + got)
            if n == 0:
                raise VerifyFailed(f"short read-back at byte {offset + got}: the target ended")
            got += n
        return view

    def sync(self) -> None:
        os.fsync(self.fd)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)  # verify reads the medium

    def close(self) -> None:
        for fd in (self.fd, self.direct):
            if fd is not None:
                os.close(fd)


class _Pacer:
    """--max-rate: sleeps so writing never goes faster than asked."""

    def __init__(self, rate: float | None):
        self.rate, self.start, self.done = rate, time.perf_counter(), 0

    def __call__(self, n: int) -> None:
        self.done += n
        if self.rate:
            ahead = self.done / self.rate - (time.perf_counter() - self.start)
            if ahead > 0:
                time.sleep(ahead)


def resolve_map(image: Path, kind: str,
                bmap_path: Path | None) -> tuple[BlockMap, str, Path | None]:
    if bmap_path is None:
        bmap_path = find_blockmap(image, kind)
    if bmap_path is not None:
        bmap = load_blockmap(bmap_path)
        _check_map(image, kind, bmap, bmap_path)
        return bmap, "bmap", bmap_path
    if kind == "raw":
        size = image.stat().st_size
        fd = os.open(image, os.O_RDONLY)
        try:
            spans = data_ranges(fd, size)
        finally:
            os.close(fd)
        return BlockMap(size, ALIGN, [Range(s, e - s) for s, e in spans]), "seek", None
    size = stream_size(image, kind)
    return BlockMap(size, ALIGN, [Range(0, size)] if size else []), "whole", None


def flash(image: Path, target_path: Path, *, target_file: bool = False,
          bmap_path: Path | None = None, verify: bool = True, progress: Progress | None = None,
          max_rate: float | None = None,
          before_verify: Callable[[Path], None] | None = None) -> FlashResult:
    """Write `image` to `target_path` and verify it. Every refusal happens before the first
    write. `before_verify(target)` runs between writing and read-back: the seam tests use to
    damage the target and prove verification notices."""
    progress = progress or (lambda *_: None)
    kind = compression_of(image)
    bmap, source, map_path = resolve_map(image, kind, bmap_path)
    target = check_target(target_path, target_file, image)
    if target.size is not None and target.size < bmap.image_size:
        raise BadInput(f"{target_path}: {target.size} bytes, smaller than the image "
                       f"({bmap.image_size} bytes)")
    if map_path is not None:
        _precheck_ranges(image, kind, bmap, map_path, progress)
    with open_stream(image, kind) as stream:
        head = stream.read(1024)
    ranges = plan(bmap, gpt=head[512:520] == b"EFI PART")
    total = sum(r.length for r in ranges)
    try:
        writer = _Writer(target, bmap.image_size)
    except OSError as exc:
        raise BadInput(f"{target_path}: cannot open it for writing ({exc.strerror}; in use?)") \
            from None
    counter = [0]
    try:
        t0 = time.perf_counter()
        digests = _write_ranges(image, kind, bmap.image_size, ranges, writer, progress,
                                _Pacer(max_rate), counter)
        writer.sync()
        write_s = time.perf_counter() - t0
        if before_verify is not None:
            before_verify(target_path)
        t1 = time.perf_counter()
        if verify:
            try:
                _verify_ranges(target_path, ranges, digests, writer, progress)
            except KeyboardInterrupt:
                raise FlashInterrupted("interrupted while verifying: the target is written but "
                                       "not verified (flash it again to be sure)") from None
        verify_s = time.perf_counter() - t1 if verify else 0.0
    except KeyboardInterrupt:
        raise FlashInterrupted(f"interrupted after writing {counter[0] // MIB} of "
                               f"{total // MIB} MiB: the target is incomplete (flash it again)") \
            from None
    finally:
        writer.close()
    return FlashResult(bmap.image_size, total, len(ranges), source, kind, write_s, verify_s,
                       str(target_path))


def _write_ranges(image: Path, kind: str, image_size: int, ranges: list[Range], writer: _Writer,
                  progress: Progress, pace: _Pacer, counter: list[int]) -> list[str]:
    """Stream the ranges onto the target; the SHA-256 of each as read. Reading and hashing
    overlap the previous chunk's write (a one-thread pool: hashlib and pwrite drop the GIL)."""
    bufs = [_aligned_buffer(CHUNK) for _ in range(3)]
    scratch = bytearray(CHUNK)
    pending: list[Future | None] = [None] * len(bufs)
    total, digests, slot = sum(r.length for r in ranges), [], 0
    with open_stream(image, kind) as stream, ThreadPoolExecutor(1) as pool:
        pos = 0
        for r in ranges:
            if kind == "raw":
                stream.seek(r.start)
            while pos < r.start and kind != "raw":  # compressed: read past the holes
                skipped = stream.readinto(memoryview(scratch)[:min(CHUNK, r.start - pos)])
                if not skipped:
                    raise ClawError(f"{image}: ended at byte {pos}, before its map's range at "
                                    f"{r.start}: the target is incomplete")
                pos += skipped
            digest, off = hashlib.sha256(), r.start
            while off < r.end:
                if pending[slot] is not None:
                    pending[slot].result()
                want = min(CHUNK, r.end - off)
                view = memoryview(bufs[slot])[:want]
                got = 0
                while got < want:
                    n = stream.readinto(view[got:])
                    if not n:
                        raise ClawError(f"{image}: ended at byte {off + got}, before the "
                                        f"{image_size} bytes its map says: the target is "
                                        "incomplete")
                    got += n
                digest.update(view)
                pending[slot] = pool.submit(writer.write, view, off)
                slot = (slot + 1) % len(bufs)
                off += want
                counter[0] += want
                pace(want)
                progress("write", counter[0], total)
            pos = r.end
            digests.append(digest.hexdigest())
            if r.sha256 and digests[-1] != r.sha256:
                raise ClawError(f"{image}: bytes {r.start}..{r.end} do not match the block "
                                "map's SHA-256 (a damaged image or the wrong map): the target "
                                "is incomplete")
        for job in pending:
            if job is not None:
                job.result()
    return digests


def _verify_ranges(target: Path, ranges: list[Range], digests: list[str], writer: _Writer,
                   progress: Progress) -> None:
    """Read every written range back and compare; the next chunk is read while this one is
    hashed."""
    chunks = [(i, off, min(CHUNK, r.end - off)) for i, r in enumerate(ranges)
              for off in range(r.start, r.end, CHUNK)]
    if not chunks:
        return
    bufs = [_aligned_buffer(CHUNK) for _ in range(2)]
    total, checked, digest = sum(r.length for r in ranges), 0, hashlib.sha256()
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(writer.read, bufs[0], chunks[0][2], chunks[0][1])
        for k, (i, off, n) in enumerate(chunks):
            view = job.result()
            if k + 1 < len(chunks):
                job = pool.submit(writer.read, bufs[(k + 1) % 2], chunks[k + 1][2],
                                  chunks[k + 1][1])
            digest.update(view)
            checked += n
            progress("verify", checked, total)
            r = ranges[i]
            if off + n == r.end:
                if digest.hexdigest() != digests[i]:
                    raise VerifyFailed(f"verification failed: bytes {r.start}..{r.end} of "
                                       f"{target} differ from the image (bad medium or a "
                                       "failing card?)")
                digest = hashlib.sha256()
