"""`claw flash` onto real loop devices: a partitioned sparse image arrives intact, a byte
damaged between write and read-back is caught, every refusal leaves the device untouched, and
an interrupted flash says the target is incomplete."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from provision.blockmap import map_image
from provision.flash import VerifyFailed, flash
from tests.conftest import CLAW, claw_subprocess

pytestmark = pytest.mark.integration
MIB = 1 << 20

if os.geteuid() != 0 or not shutil.which("losetup"):
    pytest.skip("loop devices need root and losetup", allow_module_level=True)


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


@contextmanager
def loop_device(backing: Path, *options: str) -> Iterator[str]:
    dev = sh("losetup", "-f", "--show", *options, str(backing))
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def blank(path: Path, size: int, fill: bytes | None = None) -> Path:
    with open(path, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            for _ in range(size // MIB):
                f.write(fill * (MIB // len(fill)))
    return path


def partitioned_image(path: Path, size_mib: int = 96) -> Path:
    """A sparse GPT image: an ext4 root made with -d from a directory, like `claw os build`."""
    blank(path, size_mib * MIB)
    subprocess.run(["sfdisk", "-q", str(path)], input="label: gpt\nstart=2048, size=16M\n,\n",
                   text=True, check=True, capture_output=True)
    root = path.parent / "rootfs"
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "hostname").write_text("claw-flash-test\n")
    (root / "payload.bin").write_bytes(os.urandom(6 * MIB))
    start = 2048 * 512 + 16 * MIB
    length = size_mib * MIB - start - 34 * 512
    sh("mkfs.ext4", "-q", "-F", "-E", f"offset={start}", "-d", str(root), str(path),
       f"{length // 1024}k")
    return path


def sha(path: Path | str, length: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while length > 0:
            chunk = f.read(min(length, 8 * MIB))
            digest.update(chunk)
            length -= len(chunk)
    return digest.hexdigest()


def test_flash_partitioned_image_to_loop_device(tmp_path):
    img = partitioned_image(tmp_path / "os.img")
    map_image(img, "zst")
    # the target holds an old GPT and garbage: the header regions must be rewritten
    target = blank(tmp_path / "disk", 128 * MIB, fill=b"\xa5")
    with loop_device(target) as dev:
        result = claw_subprocess("flash", f"{img}.zst", dev)
        assert result.code == 0, result.err
        assert "map: bmap" in result.out and "verified in" in result.out, result.out
        assert "verify" in result.err and "MB/s" in result.err  # the progress display
        record = json.loads(claw_subprocess("flash", f"{img}.zst", dev, "--json").out)
        assert record["verified"] and record["written_bytes"] < 40 * MIB  # ~8 of 96 MiB
    # the partition table arrived (not the old garbage); its ext4 root is clean and complete
    table = json.loads(sh("sfdisk", "--json", str(target)))["partitiontable"]
    assert table["label"] == "gpt" and len(table["partitions"]) == 2
    root = table["partitions"][1]
    with loop_device(target, "-o", str(root["start"] * 512), "--sizelimit",
                     str(root["size"] * 512)) as dev:
        subprocess.run(["e2fsck", "-fn", dev], check=True, capture_output=True)
        assert sh("debugfs", "-R", "cat /etc/hostname", dev) == "claw-flash-test"
        payload = (tmp_path / "rootfs" / "payload.bin").read_bytes()
        sh("debugfs", "-R", f"dump /payload.bin {tmp_path / 'back.bin'}", dev)
        assert (tmp_path / "back.bin").read_bytes() == payload


def test_flash_sparse_raw_image_byte_for_byte(tmp_path):
    img = partitioned_image(tmp_path / "os.img")
    target = blank(tmp_path / "disk", 96 * MIB)  # zeros: unmapped ranges agree too
    with loop_device(target) as dev:
        result = flash(img, Path(dev))
        assert result.map_source == "seek" and result.verify_s > 0
        assert sha(dev, 96 * MIB) == sha(img, 96 * MIB)


def test_verification_catches_a_byte_damaged_after_writing(tmp_path):
    img = partitioned_image(tmp_path / "os.img")
    bmap, _, _ = map_image(img)
    victim = bmap.ranges[-2].start + 1234  # somewhere in the filesystem's data

    def damage(target: Path) -> None:
        fd = os.open(target, os.O_RDWR)
        try:
            byte = os.pread(fd, 1, victim)
            os.pwrite(fd, bytes([byte[0] ^ 0xFF]), victim)
            os.fsync(fd)
        finally:
            os.close(fd)

    with loop_device(blank(tmp_path / "disk", 96 * MIB)) as dev:
        with pytest.raises(VerifyFailed, match="verification failed: bytes") as caught:
            flash(img, Path(dev), before_verify=damage)
        r = next(r for r in bmap.ranges if r.start <= victim < r.end)
        assert f"{r.start}..{r.end}" in str(caught.value)
        # and untouched, the same image verifies
        assert flash(img, Path(dev)).verify_s > 0


def refused(*args: str) -> str:
    result = claw_subprocess("flash", *args)
    assert result.code == 2, (result.code, result.out, result.err)
    lines = [ln for ln in result.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in result.err, result.err
    return lines[0]


def test_refusals_leave_the_device_untouched(tmp_path):
    img = partitioned_image(tmp_path / "os.img")
    map_image(img)
    small = blank(tmp_path / "small", 64 * MIB, fill=b"\x5a")
    disk = blank(tmp_path / "disk", 128 * MIB, fill=b"\x5a")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop_device(small) as dev:
        before = sha(dev, 64 * MIB)
        assert "smaller than the image" in refused(str(img), dev)
        assert "is a block map" in refused(f"{img}.bmap", dev)
        assert "is a block device" in refused(str(img), dev, "--target-file")
        assert sha(dev, 64 * MIB) == before
    with loop_device(disk) as dev:
        sh("mkfs.ext4", "-q", "-F", dev)
        before = sha(dev, 128 * MIB)
        sh("mount", "-o", "ro,noload", dev, str(mnt))  # ro: the mount itself writes nothing
        try:
            assert f"is mounted at {mnt}" in refused(str(img), dev)
        finally:
            sh("umount", str(mnt))
        assert sha(dev, 128 * MIB) == before



def test_refuses_a_disk_whose_partition_is_mounted(tmp_path):
    img = partitioned_image(tmp_path / "os.img")
    disk = blank(tmp_path / "disk", 128 * MIB, fill=b"\x5a")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["sfdisk", "-q", str(disk)], input="label: gpt\n,32M\n,\n", text=True,
                   check=True, capture_output=True)
    with loop_device(disk, "-P") as dev:
        if not Path(f"{dev}p2").exists():
            pytest.skip(f"this kernel made no partition devices for {dev} (loop max_part=0)")
        sh("mkfs.ext4", "-q", "-F", f"{dev}p2")
        before = sha(dev, 128 * MIB)
        sh("mount", "-o", "ro,noload", f"{dev}p2", str(mnt))
        try:
            line = refused(str(img), dev)
            assert f"{Path(dev).name}p2 is mounted at {mnt}" in line, line
        finally:
            sh("umount", str(mnt))
        assert sha(dev, 128 * MIB) == before


def first_block(dev: str) -> bytes:
    fd = os.open(dev, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, 4096, 0)
    finally:
        os.close(fd)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_flash_says_the_target_is_incomplete(tmp_path, sig):
    img = partitioned_image(tmp_path / "os.img")
    with loop_device(blank(tmp_path / "disk", 96 * MIB)) as dev:
        proc = subprocess.Popen([str(CLAW), "flash", str(img), dev, "--max-rate", "2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "COLUMNS": "200"})
        deadline = time.monotonic() + 60
        while first_block(dev) == bytes(4096):  # not writing yet (still starting up)
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(sig)  # the first MiB is in; at 2 MB/s ~8 MiB are far from done
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, (out, err)
    assert "the target is incomplete" in err and "Traceback" not in err


@pytest.mark.parametrize("kind", ["raw", "zst"])
def test_image_damaged_after_mapping_is_refused_before_writing(tmp_path, kind):
    """Caught against the map's per-range hashes in the check pass before the device is
    opened: exit 2 and the device byte-identical, not a half-written card."""
    img = partitioned_image(tmp_path / "os.img")
    bmap, _, _ = map_image(img)
    with open(img, "r+b") as f:
        f.seek(bmap.ranges[-2].start + 10)
        f.write(b"\x00\x01\x02")
    if kind == "zst":
        import zstandard

        packed = tmp_path / "os.img.zst"
        packed.write_bytes(zstandard.ZstdCompressor(level=1).compress(img.read_bytes()))
        img.unlink()  # os.img.bmap stays: found beside os.img.zst
        img = packed
    disk = blank(tmp_path / "disk", 96 * MIB, fill=b"\x5a")
    with loop_device(disk) as dev:
        before = sha(dev, 96 * MIB)
        line = refused(str(img), dev)
        assert "does not match" in line and "nothing written" in line, line
        assert sha(dev, 96 * MIB) == before


def test_refuses_a_device_in_use_as_swap(tmp_path):
    img = partitioned_image(tmp_path / "os.img")
    with loop_device(blank(tmp_path / "swap", 32 * MIB)) as dev:
        sh("mkswap", "-q", dev)
        before = sha(dev, 32 * MIB)
        sh("swapon", dev)
        try:
            assert f"{dev} is in use as swap" in refused(str(img), dev)
        finally:
            sh("swapoff", dev)
        assert sha(dev, 32 * MIB) == before
