"""Block maps and `claw flash` to files and its refusals that need no device: real sparse
images, real compressors, the real CLI."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import pytest

from provision.blockmap import load_blockmap, make_blockmap, map_image
from provision.errors import BadInput
from provision.flash import flash, plan

pytestmark = pytest.mark.unit
MIB = 1 << 20


def sparse_image(path: Path, size: int = 16 * MIB, chunks=((0, 4096), (5 * MIB + 100, 9000),
                                                            (12 * MIB, MIB))) -> Path:
    """A sparse file with random data at `chunks` (offset, length)."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in chunks:
            f.seek(off)
            f.write(os.urandom(n))
    return path


def test_map_finds_the_data_ranges_and_hashes_them(tmp_path):
    img = sparse_image(tmp_path / "a.img")
    bmap = make_blockmap(img)
    assert bmap.image_size == 16 * MIB and bmap.block_size == 4096
    data = img.read_bytes()
    assert bmap.image_sha256 == hashlib.sha256(data).hexdigest()
    covered = bytearray(len(data))
    for r in bmap.ranges:
        assert r.start % 4096 == 0 and (r.end % 4096 == 0 or r.end == bmap.image_size)
        assert r.sha256 == hashlib.sha256(data[r.start:r.end]).hexdigest()
        covered[r.start:r.end] = b"\1" * r.length
    # every non-zero byte is mapped; the map is far smaller than the image
    assert all(covered[i] for i in range(len(data)) if data[i])
    assert bmap.mapped_bytes <= 2 * MIB


@pytest.mark.parametrize("kind", ["zst", "xz"])
def test_compressed_output_keeps_the_raw_images_map(tmp_path, kind):
    img = sparse_image(tmp_path / "a.img")
    bmap, bmap_path, packed = map_image(img, kind)
    assert packed.name == f"a.img.{kind}" and packed.stat().st_size < 3 * MIB
    assert load_blockmap(bmap_path).image_sha256 == bmap.image_sha256
    assert bmap.image_sha256 == hashlib.sha256(img.read_bytes()).hexdigest()
    out = tmp_path / "out.img"
    result = flash(packed, out, target_file=True)
    assert result.map_source == "bmap" and result.compression == kind
    assert out.read_bytes() == img.read_bytes()
    assert result.written_bytes < 4 * MIB


def test_plan_always_writes_header_and_gpt_backup():
    from provision.blockmap import BlockMap, Range

    bmap = BlockMap(64 * MIB, 4096, [Range(4096, 8192, "x"), Range(10 * MIB, 4096, "y")])
    ranges = plan(bmap, gpt=True)
    spans = [(r.start, r.end) for r in ranges]
    assert spans == [(0, 4096), (4096, 12288), (12288, MIB), (10 * MIB, 10 * MIB + 4096),
                     (63 * MIB, 64 * MIB)]
    assert [r.sha256 for r in ranges][1] == "x"
    assert [(r.start, r.end) for r in plan(bmap, gpt=False)][-1] == (10 * MIB, 10 * MIB + 4096)


def test_flash_to_file_without_map_uses_seek_data(tmp_path, claw):
    img = sparse_image(tmp_path / "a.img")
    out = tmp_path / "out.img"
    result = claw("flash", str(img), str(out), "--target-file", "--json")
    assert result.code == 0, result.err
    record = json.loads(result.out)
    assert record["map_source"] == "seek" and record["verified"] is True
    assert out.read_bytes() == img.read_bytes()


def test_bmap_command(tmp_path, claw):
    img = sparse_image(tmp_path / "a.img")
    result = claw("bmap", str(img), "--json")
    assert result.code == 0, result.err
    record = json.loads(result.out)
    assert record["bmap"] == f"{img}.bmap" and record["mapped_bytes"] < 2 * MIB


def refused(claw, *args) -> str:
    result = claw("flash", *args)
    assert result.code == 2, (result.code, result.out, result.err)
    assert "Traceback" not in result.err
    lines = [ln for ln in result.err.splitlines() if ln.strip()]
    assert len(lines) == 1, result.err
    return lines[0]


def test_refusals_write_nothing(tmp_path, claw):
    img = sparse_image(tmp_path / "a.img")
    map_image(img)
    plain = tmp_path / "plain"
    plain.write_bytes(b"keep")
    assert "no such image" in refused(claw, str(tmp_path / "nope.img"), str(plain),
                                      "--target-file")
    assert "is a block map" in refused(claw, f"{img}.bmap", str(plain), "--target-file")
    assert "not a block device" in refused(claw, str(img), str(plain))
    assert "no such device" in refused(claw, str(img), str(tmp_path / "sdz"))
    assert "is the image itself" in refused(claw, str(img), str(img), "--target-file")
    assert plain.read_bytes() == b"keep" and not (tmp_path / "sdz").exists()


def test_refuses_unreadable_image(tmp_path, claw):
    if os.geteuid() == 0:
        img = tmp_path / "dir.img"
        img.mkdir()  # root reads every file; a directory is unreadable as an image
        assert "is a directory" in refused(claw, str(img), str(tmp_path / "o"), "--target-file")
    else:
        img = sparse_image(tmp_path / "a.img")
        img.chmod(0)
        assert "cannot read" in refused(claw, str(img), str(tmp_path / "o"), "--target-file")
    assert not (tmp_path / "o").exists()


def test_refuses_a_map_of_another_image(tmp_path, claw):
    img = sparse_image(tmp_path / "a.img")
    other = sparse_image(tmp_path / "b.img")
    bigger = sparse_image(tmp_path / "c.img", size=32 * MIB)
    map_image(other)
    map_image(bigger)
    out = tmp_path / "out.img"
    line = refused(claw, str(img), str(out), "--target-file", "--bmap", f"{other}.bmap")
    assert "does not match" in line and "not this image's map" in line
    line = refused(claw, str(img), str(out), "--target-file", "--bmap", f"{bigger}.bmap")
    assert "33554432-byte image" in line
    assert not out.exists()


def test_malformed_map_names_the_problem(tmp_path, claw):
    img = sparse_image(tmp_path / "a.img")
    bad = tmp_path / "bad.bmap"
    bad.write_text(json.dumps({"format": "clawforge-bmap", "version": 1, "image_size": 100,
                               "block_size": 4096, "ranges": [{"start": 0, "length": 4096}]}))
    line = refused(claw, str(img), str(tmp_path / "o"), "--target-file", "--bmap", str(bad))
    assert "ranges[0]" in line and "outside the image" in line
    with pytest.raises(BadInput, match="not a block map"):
        load_blockmap(img)


def test_refuses_the_disk_holding_root(tmp_path, claw):
    from provision.flash_target import _mounts

    source = next((s for _, point, s in _mounts() if point == "/"), "")
    if not source.startswith("/dev/") or not Path(source).exists():
        pytest.skip(f"/ is not on a block device here ({source or 'unknown'})")
    line = refused(claw, str(sparse_image(tmp_path / "a.img")), source)
    assert "holds /" in line, line


def compressed(img: Path, kind: str) -> Path:
    """`img` compressed beside itself (`claw bmap` writes zst and xz; gz is made here)."""
    if kind != "gz":
        return map_image(img, kind)[2]
    packed = img.with_name(f"{img.name}.gz")
    packed.write_bytes(gzip.compress(img.read_bytes(), compresslevel=1))
    return packed


@pytest.mark.parametrize("kind", ["zst", "xz", "gz"])
def test_refuses_a_map_of_another_size_for_a_compressed_image(tmp_path, claw, kind):
    img = sparse_image(tmp_path / "a.img")
    bigger = sparse_image(tmp_path / "c.img", size=32 * MIB)
    map_image(bigger)
    packed = compressed(img, kind)
    out = tmp_path / "out.img"
    line = refused(claw, str(packed), str(out), "--target-file", "--bmap", f"{bigger}.bmap")
    assert "33554432-byte image" in line and "not this image's map" in line
    assert not out.exists()


@pytest.mark.parametrize("kind", ["zst", "xz", "gz"])
def test_map_of_another_same_size_image_refused_before_writing(tmp_path, claw, kind):
    """Same size, same layout, other contents: only the map's hashes can tell, and they are
    checked over the whole stream before the target is opened."""
    img = sparse_image(tmp_path / "a.img")
    other = sparse_image(tmp_path / "b.img")
    map_image(other)
    packed = compressed(img, kind)
    out = tmp_path / "out.img"
    out.write_bytes(b"keep")
    line = refused(claw, str(packed), str(out), "--target-file", "--bmap", f"{other}.bmap")
    assert "does not match" in line and "nothing written" in line, line
    assert out.read_bytes() == b"keep"


@pytest.mark.parametrize("kind", ["zst", "xz"])
def test_compressed_image_damaged_after_mapping_refused_before_writing(tmp_path, claw, kind):
    """Bytes flipped in the last mapped range's compressed data: refused (one line, exit 2)
    with the target file never created, not found halfway through writing."""
    img = sparse_image(tmp_path / "a.img")
    _, _, packed = map_image(img, kind)
    data = bytearray(packed.read_bytes())
    at = len(data) * 3 // 4  # inside the last 1 MiB of random data, which dominates the file
    data[at:at + 16] = bytes(b ^ 0xFF for b in data[at:at + 16])
    packed.write_bytes(bytes(data))
    out = tmp_path / "out.img"
    line = refused(claw, str(packed), str(out), "--target-file")
    assert "nothing written" in line and str(packed) in line, line
    assert not out.exists()
    img.unlink()  # the untouched raw image still flashes with its map: the check is not noise
    packed.unlink()
    _, _, packed = map_image(sparse_image(tmp_path / "a.img"), kind)
    assert claw("flash", str(packed), str(out), "--target-file").code == 0
