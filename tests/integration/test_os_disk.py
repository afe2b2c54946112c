"""Disk images as `claw os` makes and reads them, with the real tools (sfdisk, mkfs.vfat,
mtools, mkfs.ext4 -d, debugfs, blkid) on small files: no loop device, no mount. And the images
`claw os customize` refuses, each with its reason, leaving nothing behind."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from provision.osimage import disk
from provision.osimage.customize import dump_root

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(any(shutil.which(t) is None for t in disk.TOOLS),
                       reason="needs fdisk, dosfstools, mtools and e2fsprogs"),
]


def tiny_root(path, shell="/bin/dash"):
    (path / "usr/bin").mkdir(parents=True)
    (path / "etc").mkdir()
    (path / "bin").symlink_to("usr/bin")
    shutil.copy(shell, path / "usr/bin/dash")
    (path / "usr/bin/sh").symlink_to("dash")
    (path / "etc/hostname").write_text("tiny\n")
    suid = path / "usr/bin/claw-suid"
    suid.write_text("#!/bin/sh\n")
    os.chown(suid, 1000, 1000)
    os.chmod(suid, 0o4755)  # after chown, which clears setuid
    return path


def make_image(tmp_path, root, size=1 << 30, with_ext4=True):
    image = tmp_path / "disk.img"
    layout = disk.plan_gpt(size, 64)
    with open(image, "wb") as out:
        out.truncate(size)
    disk.write_partition_table(image, layout)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"not really a kernel")
    disk.make_fat(image, layout.boot, "CLAW-BOOT", {"vmlinuz": kernel})
    if with_ext4:
        disk.make_ext4(image, layout.root, root, label="claw-root")
    return image, layout


def test_image_is_laid_out_filled_and_read_back(tmp_path):
    root = tiny_root(tmp_path / "root")
    image, layout = make_image(tmp_path, root)
    assert image.stat().st_blocks * 512 < 64 << 20  # sparse: only metadata and files written
    found = disk.read_layout(image)
    assert found.label == "gpt"
    assert (found.boot.start, found.root.start, found.root.size) == (
        layout.boot.start, layout.root.start, layout.root.size)
    assert found.root.uuid.lower() == layout.root.uuid.lower()
    assert disk.fs_type(image, found.boot) == "vfat"
    cat = subprocess.run(["debugfs", "-R", "cat /etc/hostname", disk.at(image, found.root)],
                         capture_output=True, text=True)
    assert cat.stdout == "tiny\n"
    fsck = subprocess.run(["e2fsck", "-fn", disk.at(image, found.root)], capture_output=True)
    assert fsck.returncode == 0
    listing = subprocess.run(["mdir", "-b", "-i", f"{image}@@{found.boot.start}", "::/"],
                             capture_output=True, text=True)
    assert "VMLINUZ" in listing.stdout.upper()


def test_root_copied_out_keeps_owners_and_setuid(tmp_path):
    image, layout = make_image(tmp_path, tiny_root(tmp_path / "root"))
    out = tmp_path / "out"
    dump_root(image, layout.root, out)
    st = os.lstat(out / "usr/bin/claw-suid")
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o4755, 1000, 1000)
    assert os.readlink(out / "bin") == "usr/bin"


def test_customize_refuses_what_it_cannot_understand(claw, tmp_path):
    out = tmp_path / "out"
    out.mkdir()

    def refused(base, reason):
        result = claw("os", "customize", str(base), "-o", str(out / "dev.img"))
        assert result.code == 2, result
        assert reason in result.err and "Traceback" not in result.err, result.err
        assert list(out.iterdir()) == []  # the work directory went too

    blank = tmp_path / "blank.img"
    with open(blank, "wb") as f:
        f.truncate(64 << 20)
    refused(blank, "no partition table found")

    fat_only, _ = make_image(tmp_path, None, with_ext4=False)
    refused(fat_only, "no ext4 root partition")

    x86 = tmp_path / "x86"
    x86.mkdir()
    image, _ = make_image(x86, tiny_root(x86 / "root"))
    refused(image, "the root is not arm64")
