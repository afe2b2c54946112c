"""Disk images as `claw os` makes and reads them, with the real tools (sfdisk, mkfs.vfat,
mtools, mkfs.ext4 -d, debugfs, blkid) on small files: no loop device, no mount. And the images
`claw os customize` refuses, each with its reason, leaving nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess

import pytest

from provision.errors import ClawError
from provision.osimage import disk
from provision.osimage.ext4copy import copy_out

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


def make_image(tmp_path, root, size=1 << 30, with_ext4=True, table="gpt"):
    image = tmp_path / "disk.img"
    layout = disk.plan_gpt(size, 64) if table == "gpt" else disk.plan_mbr(size, 64)
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


CAP_NET_RAW = bytes.fromhex("0100000200200000" + "00" * 12)  # setcap cap_net_raw+ep


def vendor_root(path):
    """tiny_root plus what debugfs rdump alone loses: extended attributes (a file capability,
    a user. one with a NUL in it, an ACL-free directory attribute), a hard-linked pair, device
    nodes, a FIFO and a socket."""
    root = tiny_root(path)
    ping = root / "usr/bin/ping"
    shutil.copy(root / "usr/bin/dash", ping)
    os.setxattr(ping, "security.capability", CAP_NET_RAW)
    os.setxattr(ping, "user.claw", b"kept\x00bytes")
    os.setxattr(root / "etc", "user.dir", b"on a directory")
    (root / "usr/bin/perl").write_text("#!/bin/sh\n")
    os.link(root / "usr/bin/perl", root / "usr/bin/perl5.36")
    (root / "dev").mkdir()
    os.mknod(root / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chmod(root / "dev/null", 0o666)
    os.mknod(root / "dev/sda", stat.S_IFBLK | 0o660, os.makedev(8, 0))
    os.chown(root / "dev/sda", 0, 6)
    (root / "run").mkdir()
    os.mkfifo(root / "run/initctl", 0o600)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "run/claw.sock"))
    return root


def test_root_copied_out_keeps_what_rdump_drops(tmp_path):
    image, layout = make_image(tmp_path, vendor_root(tmp_path / "root"))
    out = tmp_path / "vendor root"  # a space: debugfs' command parser needs it quoted
    copied = copy_out(image, layout.root, out)
    st = os.lstat(out / "usr/bin/claw-suid")
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o4755, 1000, 1000)
    assert os.readlink(out / "bin") == "usr/bin"
    assert os.getxattr(out / "usr/bin/ping", "security.capability") == CAP_NET_RAW
    assert os.getxattr(out / "usr/bin/ping", "user.claw") == b"kept\x00bytes"
    assert os.getxattr(out / "etc", "user.dir") == b"on a directory"
    perl, perl5 = os.lstat(out / "usr/bin/perl"), os.lstat(out / "usr/bin/perl5.36")
    assert perl.st_ino == perl5.st_ino and perl.st_nlink == 2
    null, sda = os.lstat(out / "dev/null"), os.lstat(out / "dev/sda")
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666
    assert stat.S_ISBLK(sda.st_mode) and sda.st_rdev == os.makedev(8, 0) and sda.st_gid == 6
    assert stat.S_ISFIFO(os.lstat(out / "run/initctl").st_mode)
    assert stat.S_ISSOCK(os.lstat(out / "run/claw.sock").st_mode)
    assert (copied.hard_links, copied.special_files, copied.xattrs) == (1, 4, 3)


def debugfs_out(image, part, command):
    return subprocess.run(["debugfs", "-R", command, disk.at(image, part)], capture_output=True,
                          text=True, check=True).stdout


def test_root_written_back_keeps_what_rdump_drops(tmp_path):
    """The whole path customize takes: copied out, then mkfs.ext4 -d into another image;
    read back with debugfs, not through the copy."""
    image, layout = make_image(tmp_path, vendor_root(tmp_path / "root"))
    copy_out(image, layout.root, tmp_path / "out")
    again = tmp_path / "again"
    again.mkdir()
    image2, layout2 = make_image(again, tmp_path / "out")
    raw = tmp_path / "cap.bin"
    debugfs_out(image2, layout2.root, f"ea_get -f {raw} /usr/bin/ping security.capability")
    assert raw.read_bytes() == CAP_NET_RAW
    assert "user.dir (14)" in debugfs_out(image2, layout2.root, "ea_list /etc")
    listing = {line.split("/")[5]: line.split("/") for line in
               debugfs_out(image2, layout2.root, "ls -p /usr/bin").splitlines()
               if line.count("/") == 7}
    assert listing["perl"][1] == listing["perl5.36"][1]  # one inode, two names
    assert listing["claw-suid"][2:5] == ["104755", "1000", "1000"]
    assert "Links: 2" in debugfs_out(image2, layout2.root, "stat /usr/bin/perl")
    assert "Device major/minor number: 08:00" in debugfs_out(image2, layout2.root,
                                                             "stat /dev/sda")
    modes = {line.split("/")[5]: line.split("/")[2] for line in
             debugfs_out(image2, layout2.root, "ls -p /run").splitlines() if line.count("/") == 7}
    assert (modes["initctl"], modes["claw.sock"]) == ("010600", "140755")
    assert subprocess.run(["e2fsck", "-fn", disk.at(image2, layout2.root)],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("table", ["gpt", "dos"])
def test_root_partition_grows_to_the_disk_end(tmp_path, table):
    """The file made longer, the root (last) partition grown into the new room by sfdisk: the
    boot partition, the root's start, type and PARTUUID and the disk id kept, the table valid
    (GPT's backup header moved to the new end), and a filesystem written at the new size."""
    root = tiny_root(tmp_path / "root")
    image, _ = make_image(tmp_path, root, table=table)
    before = disk.read_layout(image)
    disk_id = json.loads(subprocess.run(["sfdisk", "--json", str(image)], capture_output=True,
                                        text=True).stdout)["partitiontable"]["id"]
    with open(image, "r+b") as out:
        out.truncate(2 << 30)
    after = disk.grow_root(image, before)
    assert after.boot == before.boot
    assert (after.root.start, after.root.type, after.root.uuid) == (
        before.root.start, before.root.type, before.root.uuid)
    assert after.root.end == (2 << 30) - (disk.MIB if table == "gpt" else 0)
    table_now = json.loads(subprocess.run(["sfdisk", "--json", str(image)], capture_output=True,
                                          text=True).stdout)["partitiontable"]
    assert table_now["id"] == disk_id
    verify = subprocess.run(["sfdisk", "--verify", str(image)], capture_output=True, text=True)
    assert verify.returncode == 0 and "No errors detected" in verify.stdout, verify
    disk.make_ext4(image, after.root, root)
    assert subprocess.run(["e2fsck", "-fn", disk.at(image, after.root)],
                          capture_output=True).returncode == 0
    assert disk.grow_root(image, after) == after  # nothing more to grow into


def test_root_partition_before_another_cannot_grow(tmp_path):
    image = tmp_path / "disk.img"
    with open(image, "wb") as out:
        out.truncate(1 << 30)
    table = (f"label: gpt\nstart=2048, size=131072, type={disk.ESP_TYPE}\n"
             "start=133120, size=1048576, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n"
             "start=1181696, size=131072, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n")
    disk.run(["sfdisk", "-q", str(image)], "sfdisk", input=table)
    before = disk.Layout("gpt", 1 << 30, disk.Partition(1, disk.MIB, 64 * disk.MIB, "", ""),
                         disk.Partition(2, 133120 * 512, 512 * disk.MIB, "", ""))
    with pytest.raises(ClawError, match="partition 3 lies after the root partition"):
        disk.grow_root(image, before)
    after = json.loads(subprocess.run(["sfdisk", "--json", str(image)], capture_output=True,
                                      text=True).stdout)["partitiontable"]["partitions"]
    assert after[1]["size"] == 1048576  # the table untouched


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

    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate((1 << 30) + disk.MIB)
    result = claw("os", "customize", str(big), "-o", str(out / "dev.img"), "--size", "1G")
    assert result.code == 2 and "--size 1G: smaller than the base image" in result.err, result
    assert list(out.iterdir()) == []
