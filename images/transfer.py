"""Moving images to fleets: zstd tarballs with a checksum where there is no registry, and push
where there is one.

Export streams `docker save` through zstd into a temporary file next to the target and renames
it only when complete, with a `FILE.sha256` (sha256sum's format) beside it; a full disk leaves
nothing behind. Import checks that checksum before it streams the tarball into `docker load`.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from images.base import docker_client
from images.build import split_tag
from provision.errors import BadInput, ClawError

CHUNK = 1 << 20
SUFFIXES = (".tar.zst", ".tar")

Progress = Callable[[int], None]


class _Hashing:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, raw: IO[bytes]):
        self.raw, self.digest, self.written = raw, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.raw.write(data)
        self.digest.update(data)
        self.written += len(data)
        return len(data)

    def flush(self) -> None:
        self.raw.flush()


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _get_image(client: Any, tag: str) -> Any:
    import docker

    try:
        return client.images.get(tag)
    except docker.errors.ImageNotFound:
        raise BadInput(f"image {tag!r} not found (expected a local image; see `docker images` "
                       "or `claw image build`)") from None


def export_image(tag: str, output: Path, progress: Progress = lambda n: None) -> dict[str, Any]:
    """`docker save TAG | zstd > OUTPUT`, atomically, with OUTPUT.sha256 beside it."""
    import zstandard

    if not output.name.endswith(SUFFIXES):
        raise BadInput(f"{output}: expected a file name ending in {' or '.join(SUFFIXES)}")
    if not output.parent.is_dir():
        raise BadInput(f"{output.parent}: no such directory")
    client = docker_client()
    image = _get_image(client, tag)
    part = output.with_name(f".{output.name}.{os.getpid()}.part")
    sums = checksum_path(output)
    sums_part = sums.with_name(f".{sums.name}.{os.getpid()}.part")
    raw_bytes = 0
    try:
        with open(part, "wb") as raw:
            sink = _Hashing(raw)
            compress = output.name.endswith(".zst")
            writer: Any = (zstandard.ZstdCompressor(level=3, threads=-1, write_checksum=True)
                           .stream_writer(sink, closefd=False) if compress else sink)
            for chunk in client.api.get_image(tag, chunk_size=CHUNK):
                writer.write(chunk)
                raw_bytes += len(chunk)
                progress(raw_bytes)
            if compress:
                writer.flush(zstandard.FLUSH_FRAME)
            raw.flush()
            os.fsync(raw.fileno())
        sha = sink.digest.hexdigest()
        sums_part.write_text(f"{sha}  {output.name}\n")
        os.replace(part, output)
        os.replace(sums_part, sums)
    except OSError as exc:
        part.unlink(missing_ok=True)
        sums_part.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise ClawError(f"{output}: no space left on device after {raw_bytes / 2**20:.0f} MiB "
                            "of the image; nothing was written") from None
        raise ClawError(f"{output}: cannot write the export ({exc.strerror or exc})") from None
    except BaseException:
        part.unlink(missing_ok=True)
        sums_part.unlink(missing_ok=True)
        raise
    return {"tag": tag, "image_id": image.id, "file": str(output), "sha256": sha,
            "image_bytes": raw_bytes, "file_bytes": output.stat().st_size}


SMALL_MEMBER = 1 << 20  # what a layerless copy keeps in memory: manifests, configs, tags


def layerless_copy(tarball: Path, output: Path) -> Path:
    """`tarball` (a `docker save` zstd tarball) without the layers its manifest lists: manifest,
    config and tags, a few KB. `docker load` opens a layer's file only for a layer its engine
    lacks, so it takes this copy where every layer is there already (a release that changed
    only a label, on a device that runs the one before) and fails, loading nothing, where one
    is missing. Written atomically."""
    import io
    import json
    import tarfile

    import zstandard

    kept: list[tuple[tarfile.TarInfo, bytes | None]] = []
    left_out: set[str] = set()
    with open(tarball, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as stream, \
            tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:  # one pass: the manifest comes last, after the layers it lists
            if member.isfile() and member.size > SMALL_MEMBER:
                left_out.add(member.name)
                continue
            data = tar.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            kept.append((member, data))
    manifest = next((json.loads(data) for m, data in kept if m.name == "manifest.json"), None)
    if manifest is None:
        raise ClawError(f"{tarball}: no manifest.json (expected a `docker save` tarball)")
    layers = {path for entry in manifest for path in entry["Layers"]}
    if left_out - layers:  # only layers are left out, or the copy could not stand in for it
        raise ClawError(f"{tarball}: {sorted(left_out - layers)[0]} is large and not a layer")
    part = output.with_name(f".{output.name}.{os.getpid()}.part")
    try:
        with open(part, "wb") as raw, \
                zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False) as zst, \
                tarfile.open(fileobj=zst, mode="w|") as out:
            for member, data in kept:
                if member.name not in layers:
                    out.addfile(member, io.BytesIO(data) if data is not None else None)
        os.replace(part, output)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return output


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path) -> str:
    sums = checksum_path(path)
    if not sums.is_file():
        raise BadInput(f"{sums}: checksum file missing (expected the one `claw image export` "
                       "writes beside the tarball; --no-verify skips the check)")
    expected = sums.read_text().split()[0] if sums.read_text().split() else ""
    actual = file_sha256(path)
    if actual != expected:
        raise BadInput(f"{path}: sha256 {actual[:16]}… does not match {sums.name} "
                       f"({expected[:16]}…): the file is damaged or incomplete")
    return actual


def import_image(path: Path, check: bool = True) -> list[str]:
    """`zstd -d < FILE | docker load`, after checking FILE against FILE.sha256."""
    import zstandard

    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    if not path.name.endswith(SUFFIXES):
        raise BadInput(f"{path}: expected a file name ending in {' or '.join(SUFFIXES)}")
    if check:
        verify(path)
    client = docker_client()
    loaded: list[str] = []
    with open(path, "rb") as f:
        reader = (zstandard.ZstdDecompressor().stream_reader(f) if path.name.endswith(".zst")
                  else f)
        try:
            for chunk in client.api.load_image(reader):
                if "error" in chunk:
                    raise ClawError(f"{path}: docker load failed: {chunk['error']}")
                stream = chunk.get("stream", "")
                for prefix in ("Loaded image: ", "Loaded image ID: "):
                    if stream.startswith(prefix):
                        loaded.append(stream[len(prefix):].strip())
        except zstandard.ZstdError as exc:
            raise BadInput(f"{path}: not a valid zstd stream ({exc})") from None
    if not loaded:
        raise ClawError(f"{path}: docker load reported no image")
    return loaded


def push_image(tag: str, registry: str) -> str:
    """Tag `tag` under `registry` and push it; the pushed reference."""
    if not registry or "/" in registry.rstrip("/") or " " in registry:
        raise BadInput(f"--registry {registry!r} is not valid (expected host[:port], e.g. "
                       "registry.local:5000)")
    client = docker_client()
    _get_image(client, tag)
    repository, version = split_tag(tag)
    target = f"{registry.rstrip('/')}/{repository}"
    client.api.tag(tag, target, version)
    for chunk in client.api.push(target, version, stream=True, decode=True):
        if "error" in chunk:
            detail = (chunk.get("errorDetail") or {}).get("message") or chunk["error"]
            raise ClawError(f"push of {target}:{version} failed: {detail}")
    return f"{target}:{version}"
