"""Block maps: which byte ranges of a disk image hold data, and their SHA-256.

A 4 GiB image built sparse holds maybe 1 GiB of data; the map lets `claw flash` write (and
verify) only that, even after the image went through a compressor that forgot its holes.
Same idea as bmaptool's XML map, kept as a small JSON document (IMAGE.bmap):

    {"format": "clawforge-bmap", "version": 1, "image_size": N, "block_size": 4096,
     "mapped_bytes": M, "image_sha256": "<hex of the whole image, holes read as zeros>",
     "ranges": [{"start": BYTE, "length": BYTES, "sha256": "<hex>"}, ...]}

Ranges are found with SEEK_DATA/SEEK_HOLE, widened to whole blocks (capped at the image end),
sorted and disjoint. Optional compression (.zst, .xz) keeps the map of the uncompressed image.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
from dataclasses import dataclass, field
from pathlib import Path

from provision.errors import BadInput

FORMAT = "clawforge-bmap"
VERSION = 1
BLOCK_SIZE = 4096
CHUNK = 8 << 20
ZEROS = bytes(CHUNK)


@dataclass(frozen=True)
class Range:
    start: int
    length: int
    sha256: str | None = None

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass
class BlockMap:
    image_size: int
    block_size: int
    ranges: list[Range]
    image_sha256: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def mapped_bytes(self) -> int:
        return sum(r.length for r in self.ranges)

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "image_size": self.image_size,
                "block_size": self.block_size, "mapped_bytes": self.mapped_bytes,
                "image_sha256": self.image_sha256,
                "ranges": [{"start": r.start, "length": r.length, "sha256": r.sha256}
                           for r in self.ranges]}


def data_ranges(fd: int, size: int, block_size: int = BLOCK_SIZE) -> list[tuple[int, int]]:
    """(start, end) of the regions holding data, block-aligned and merged."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        start, end = start // block_size * block_size, min(-(-end // block_size) * block_size, size)
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
        pos = end
    return out


def _hash_range(fd: int, start: int, end: int, whole: hashlib._Hash | None,
                sink=None) -> str:
    digest = hashlib.sha256()
    pos = start
    while pos < end:
        buf = os.pread(fd, min(CHUNK, end - pos), pos)
        if not buf:
            raise BadInput(f"image shrank while mapping it (short read at byte {pos})")
        digest.update(buf)
        if whole is not None:
            whole.update(buf)
        if sink is not None:
            sink(buf)
        pos += len(buf)
    return digest.hexdigest()


def _zeros(length: int, whole: hashlib._Hash, sink=None) -> None:
    while length > 0:
        n = min(length, CHUNK)
        whole.update(ZEROS[:n])
        if sink is not None:
            sink(ZEROS[:n])
        length -= n


def make_blockmap(image: Path, sink=None, block_size: int = BLOCK_SIZE) -> BlockMap:
    """Map a raw image; `sink(bytes)` receives the whole image in order (for a compressor)."""
    try:
        fd = os.open(image, os.O_RDONLY)
    except OSError as exc:
        raise BadInput(f"{image}: cannot read the image ({exc.strerror})") from None
    try:
        size = os.fstat(fd).st_size
        whole = hashlib.sha256()
        ranges, pos = [], 0
        for start, end in data_ranges(fd, size, block_size):
            _zeros(start - pos, whole, sink)
            ranges.append(Range(start, end - start, _hash_range(fd, start, end, whole, sink)))
            pos = end
        _zeros(size - pos, whole, sink)
        return BlockMap(size, block_size, ranges, whole.hexdigest())
    finally:
        os.close(fd)


def write_atomic(path: Path, write) -> None:
    """Nothing half-written: `write(file)` fills a temp file that is renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            write(out)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_blockmap(bmap: BlockMap, path: Path) -> None:
    write_atomic(path, lambda out: out.write(
        (json.dumps(bmap.to_json(), indent=1) + "\n").encode()))


def map_image(image: Path, compress: str | None = None) -> tuple[BlockMap, Path, Path]:
    """IMAGE.bmap beside IMAGE, and IMAGE.zst/.xz when asked; returns (map, map path, image
    path to flash)."""
    bmap_path = image.with_name(image.name + ".bmap")
    if compress is None:
        bmap = make_blockmap(image)
        save_blockmap(bmap, bmap_path)
        return bmap, bmap_path, image
    if compress not in ("zst", "xz"):
        raise BadInput(f"--compress {compress!r}: expected zst or xz")
    packed = image.with_name(f"{image.name}.{compress}")
    holder: dict = {}

    def write(out) -> None:
        if compress == "zst":
            import zstandard

            with zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(
                    out, size=image.stat().st_size, closefd=False) as comp:
                holder["map"] = make_blockmap(image, sink=comp.write)
        else:
            with lzma.LZMAFile(out, "wb", preset=1) as comp:
                holder["map"] = make_blockmap(image, sink=comp.write)

    write_atomic(packed, write)
    save_blockmap(holder["map"], bmap_path)
    return holder["map"], bmap_path, packed


def looks_like_blockmap(head: bytes) -> bool:
    """A block map's first bytes (ours, or bmaptool's XML) — never a disk image."""
    text = head.lstrip()
    return (text.startswith(b"{") and FORMAT.encode() in head) or (
        text.startswith(b"<?xml") and b"<bmap" in head)


def load_blockmap(path: Path) -> BlockMap:
    """Read IMAGE.bmap; a malformed map is bad input naming the field."""
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise BadInput(f"{path}: cannot read the block map ({exc.strerror})") from None
    except (ValueError, UnicodeDecodeError):
        raise BadInput(f"{path}: not a block map (expected {FORMAT} JSON)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BadInput(f"{path}: not a block map (expected format: {FORMAT})")
    if doc.get("version") != VERSION:
        raise BadInput(f"{path}: version {doc.get('version')!r}: expected {VERSION}")
    try:
        size, block = int(doc["image_size"]), int(doc["block_size"])
        ranges = [Range(int(r["start"]), int(r["length"]), r.get("sha256"))
                  for r in doc["ranges"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise BadInput(f"{path}: malformed block map ({type(exc).__name__}: {exc})") from None
    prev = 0
    for i, r in enumerate(ranges):
        if r.start < prev or r.length <= 0 or r.end > size:
            raise BadInput(f"{path}: ranges[{i}] ({r.start}+{r.length}) is out of order or "
                           f"outside the image ({size} bytes)")
        prev = r.end
    return BlockMap(size, block, ranges, doc.get("image_sha256"))
