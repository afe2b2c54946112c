"""`claw os build` for U-Boot boards, end to end.

- The U-Boot boot chain boots: a profile extending qemu-virt with `bootloader: u-boot` is
  built through the real CLI and booted by Debian's U-Boot for QEMU (u-boot-qemu's qemu_arm64
  as -bios), which finds extlinux/extlinux.conf on the FAT partition by its standard boot, loads
  the Image and initrd and mounts the root by label; then SSH in.
- The rk3588 image is right where no board is at hand: its loader bytes at sector 64 (a
  u-boot-rockchip.bin packed by U-Boot's own mkimage: RKNS idbloader + FIT at 0x7f8000, with
  QEMU's U-Boot as a stand-in payload, since Debian has no RK3588 U-Boot), partitions after
  it, extlinux.conf naming files that are on the partition, the kernel's own rk3588-rock-5b.dtb
  and the board's storage drivers in the initramfs.

Run time: the U-Boot qemu-virt root shares the qemu-virt base; its own part (a MODULES=most
initramfs, the base role) took ~N min cold under qemu-user here. The rk3588 root is a
bookworm debootstrap with bookworm-backports' 6.12 kernel, ~M min cold. With the roots cached
both builds take ~1 min and the U-Boot boot to SSH ~1 min under TCG.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from provision import vm as vms
from provision.osimage import disk, uboot

U_BOOT_QEMU = Path("/usr/lib/u-boot/qemu_arm64/u-boot.bin")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(3600),
    pytest.mark.skipif(shutil.which(vms.QEMU) is None,
                       reason=f"{vms.QEMU} is not installed (apt-get install qemu-system-arm)"),
    pytest.mark.skipif(not U_BOOT_QEMU.exists(),
                       reason=f"{U_BOOT_QEMU} is missing (apt-get install u-boot-qemu)"),
]
CLAW = Path(sys.executable).parent / "claw"
HOSTNAME, USER = "claw-e2e-uboot", "clawops"
PROFILE = """\
# QEMU's virt machine booted as a U-Boot board is: extlinux.conf on the FAT partition, root by
# label; no fdt line, so U-Boot hands the kernel QEMU's own device tree.
name: qemu-virt-uboot
extends: qemu-virt
description: QEMU virt through U-Boot and extlinux (the boot-tested stand-in for U-Boot boards)
os:
  bootloader: u-boot
  boot_partition_mb: 256
  root_device: LABEL=claw-root
  initramfs_modules: []                     # the base's virtio list is what QEMU needs
"""


def claw_build(*args: str, env: dict[str, str] | None = None) -> dict:
    started = time.monotonic()
    done = subprocess.run([str(CLAW), "os", "build", *args, "--json",
                           # the bootloader is what this checks: the roles' effects are
                           # test_os_build's (all of them cost minutes more of a cold root)
                           "--tags", "base"],
                          capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout)
    print(f"claw os build {args[0]}: {time.monotonic() - started:.0f} s, "
          f"steps {record['steps']}")
    return record


@pytest.fixture(scope="module")
def virt_built(tmp_path_factory):
    out = tmp_path_factory.mktemp("uboot")
    profiles = out / "config" / "clawforge" / "profiles"
    profiles.mkdir(parents=True)
    (profiles / "qemu-virt-uboot.yml").write_text(PROFILE)
    key = out / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    image = out / "virt-uboot.img"
    record = claw_build("qemu-virt-uboot", "-o", str(image), "--size", "3G", "--hostname",
                        HOSTNAME, "--user", USER, "--ssh-key", f"{key}.pub", "--u-boot", "none",
                        env={"XDG_CONFIG_HOME": str(out / "config")})
    return image, key, record


@pytest.fixture(scope="module")
def booted(virt_built):
    image, key, _ = virt_built
    started = time.monotonic()
    machine = vms.start_vm(vms.VmImage(U_BOOT_QEMU, U_BOOT_QEMU, image), name="claw-os-uboot-e2e",
                           user=USER, key=key, disk_size=4 << 30, firmware=U_BOOT_QEMU,
                           boot_timeout=600, progress=lambda _: None)
    print(f"U-Boot boot to SSH: {time.monotonic() - started:.0f} s")
    try:
        yield machine
    finally:
        machine.stop()


def sh(machine: vms.Vm, command: str) -> str:
    return machine.ssh(command, check=True).stdout.strip()


def test_boots_through_u_boot_and_extlinux(booted, virt_built):
    _, _, record = virt_built
    assert record["u_boot"] is None and "U-Boot not written" in record["boot"]
    assert sh(booted, "hostname") == HOSTNAME
    cmdline = sh(booted, "cat /proc/cmdline")
    assert cmdline.startswith("root=LABEL=claw-root "), cmdline  # extlinux's append, verbatim
    assert "BOOT_IMAGE" not in cmdline  # not GRUB, not QEMU's -append
    assert sh(booted, "findmnt -no LABEL /") == "claw-root"
    assert "linux,dummy-virt" in sh(booted, "tr '\\0' ' ' < /proc/device-tree/compatible")
    assert sh(booted, "test -d /sys/firmware/efi && echo uefi || echo no-efi") == "no-efi"


# --- rk3588: the image's structure ------------------------------------------------------

def stand_in_loader(out: Path) -> Path:
    """u-boot-rockchip.bin as binman lays it out, packed by mkimage (u-boot-tools): an RK35
    idbloader (RKNS header; bookworm's mkimage knows rk3568, the same header as rk3588's) at 0
    and a FIT at 0x7f8000. The payload is QEMU's U-Boot: a board would need its own."""
    if shutil.which("mkimage") is None:
        pytest.skip("mkimage is not installed (apt-get install u-boot-tools)")
    payload = U_BOOT_QEMU.read_bytes()
    (out / "tpl.bin").write_bytes(payload[:8192])
    (out / "spl.bin").write_bytes(payload[:65536])
    idb, itb = out / "idbloader.img", out / "u-boot.itb"
    subprocess.run(["mkimage", "-n", "rk3568", "-T", "rksd", "-d",
                    f"{out / 'tpl.bin'}:{out / 'spl.bin'}", str(idb)], check=True,
                   capture_output=True)
    subprocess.run(["mkimage", "-f", "auto", "-A", "arm64", "-O", "u-boot", "-T", "firmware",
                    "-C", "none", "-a", "0x200000", "-e", "0x200000", "-n",
                    "claw stand-in U-Boot", "-d", str(U_BOOT_QEMU), str(itb)], check=True,
                   capture_output=True)
    loader = out / "u-boot-rockchip.bin"
    loader.write_bytes(idb.read_bytes().ljust(uboot.ITB_OFFSET, b"\0") + itb.read_bytes())
    return loader


@pytest.fixture(scope="module")
def rk3588_built(tmp_path_factory):
    out = tmp_path_factory.mktemp("rk3588")
    loader = stand_in_loader(out)
    image = out / "rk3588.img"
    record = claw_build("rk3588", "-o", str(image), "--size", "3G", "--hostname", "rock5b",
                        "--u-boot", str(loader))
    return image, loader, record


def fat_read(image: Path, layout: disk.Layout, name: str) -> bytes:
    return subprocess.run(["mtype", "-i", f"{image}@@{layout.boot.start}", f"::/{name}"],
                          capture_output=True, check=True).stdout


def root_read(image: Path, layout: disk.Layout, path: str) -> bytes:
    done = subprocess.run(["debugfs", "-R", f"cat {path}", disk.at(image, layout.root)],
                          capture_output=True, check=True)
    return done.stdout


def test_rk3588_loader_at_sector_64(rk3588_built):
    image, loader, record = rk3588_built
    data = loader.read_bytes()
    with open(image, "rb") as src:
        src.seek(64 * 512)
        written = src.read(len(data))
    assert written == data and written[:4] == b"RKNS"
    assert record["u_boot"] == {"offset": 32768, "size": len(data),
                                "sha256": record["u_boot"]["sha256"]}
    itb = Path(str(image) + ".itb")
    itb.write_bytes(written[uboot.ITB_OFFSET:])
    listed = subprocess.run(["dumpimage", "-l", str(itb)], capture_output=True, text=True,
                            check=True).stdout
    itb.unlink()
    assert "claw stand-in U-Boot" in listed  # the FIT reads back at sector 16384


def test_rk3588_partitions_after_the_loader(rk3588_built):
    image, loader, _ = rk3588_built
    table = json.loads(subprocess.run(["sfdisk", "--json", str(image)], capture_output=True,
                                      text=True, check=True).stdout)["partitiontable"]
    boot, root = table["partitions"]
    assert table["label"] == "gpt"
    assert boot["start"] == 32768 and boot["start"] * 512 >= 64 * 512 + loader.stat().st_size
    assert boot.get("attrs") == "LegacyBIOSBootable"
    assert root["start"] == boot["start"] + boot["size"]
    layout = disk.read_layout(image)
    assert disk.fs_type(image, layout.boot) == "vfat"
    assert subprocess.run(["blkid", "-p", "-o", "value", "-s", "LABEL", "-O",
                           str(layout.root.start), str(image)], capture_output=True, text=True,
                          check=True).stdout.strip() == "claw-root"


def test_rk3588_extlinux_names_what_is_there(rk3588_built):
    image, _, _ = rk3588_built
    layout = disk.read_layout(image)
    conf = fat_read(image, layout, "extlinux/extlinux.conf").decode()
    entries = dict(re.findall(r"^\s+(linux|initrd|fdt|append)\s+(.+)$", conf, re.M))
    assert entries["fdt"] == "/dtbs/rockchip/rk3588-rock-5b.dtb"
    append = entries["append"].split()
    assert "root=LABEL=claw-root" in append and "console=ttyS2,1500000" in append
    kernel = fat_read(image, layout, entries["linux"])
    assert kernel[0x38:0x3c] == b"ARM\x64"  # an uncompressed arm64 Image, for booti
    dtb = fat_read(image, layout, entries["fdt"])
    assert dtb[:4] == uboot.FDT_MAGIC and b"radxa,rock-5b" in dtb and b"rockchip,rk3588" in dtb

    boot = root_read(image, layout, "/boot").decode(errors="replace")
    version = re.search(r"vmlinuz-(6\.12[^\s\x00/]*-arm64)", boot)
    assert version, "no 6.12 kernel (bookworm-backports) in the root's /boot"
    own = root_read(image, layout, f"/usr/lib/linux-image-{version[1]}/rockchip/"
                                   "rk3588-rock-5b.dtb")
    assert dtb == own  # the device tree is the installed kernel's own

    initrd = fat_read(image, layout, entries["initrd"])
    cpio = gzip.decompress(initrd) if initrd[:2] == b"\x1f\x8b" else initrd
    for module in (b"dw_mmc-rockchip.ko", b"sdhci-of-dwcmshc.ko", b"nvme.ko"):
        assert module in cpio, f"{module!r} missing from the initramfs (os.initramfs_modules)"
