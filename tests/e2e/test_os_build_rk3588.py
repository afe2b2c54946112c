"""`claw os build rk3588`: the image is right where no board is at hand. Its loader bytes at
sector 64 (a u-boot-rockchip.bin packed by U-Boot's own mkimage: RKNS idbloader + FIT at
0x7f8000, with QEMU's U-Boot as a stand-in payload, since Debian has no RK3588 U-Boot),
partitions after it, extlinux.conf naming files that are on the partition, the kernel's own
rk3588-rock-5b.dtb (bookworm-backports' 6.12) and the board's storage drivers in the
initramfs.

Run time: the rk3588 base is a copy of the qemu-virt base with bookworm-backports' kernel
swapped in (142 s cold here, load ~15 on 2 cores; no second debootstrap), its provisioned root
(the board's initramfs modules, the base role) 103 s: 3 passed in 257 s cold, ~35 s cached.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from provision.osimage import disk, uboot
from tests.e2e.os_images import BASE_ROLE_ONLY, claw_os, debugfs, fat_read, unpacked
from tests.e2e.test_os_build_uboot import U_BOOT_QEMU

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(3600),
    pytest.mark.skipif(not U_BOOT_QEMU.exists(),
                       reason=f"{U_BOOT_QEMU} is missing (apt-get install u-boot-qemu)"),
]


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
    record = claw_os("build", "rk3588", "-o", str(image), "--size", "3G", "--hostname",
                     "rock5b", "--u-boot", str(loader), *BASE_ROLE_ONLY)
    return image, loader, record


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

    boot = debugfs(image, layout, "ls /boot").decode(errors="replace")
    version = re.search(r"vmlinuz-(6\.12[^\s\x00/]*-arm64)", boot)
    assert version, "no 6.12 kernel (bookworm-backports) in the root's /boot"
    own = debugfs(image, layout, f"cat /usr/lib/linux-image-{version[1]}/rockchip/"
                                 "rk3588-rock-5b.dtb")
    assert dtb == own  # the device tree is the installed kernel's own

    initrd = fat_read(image, layout, entries["initrd"])
    cpio = unpacked(initrd)
    for module in (b"dw_mmc-rockchip.ko", b"sdhci-of-dwcmshc.ko", b"nvme.ko"):
        assert module in cpio, f"{module!r} missing from the initramfs (os.initramfs_modules)"
