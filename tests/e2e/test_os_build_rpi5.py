"""`claw os build rpi5`: the image's structure, checked where no Pi 5 is at hand. QEMU has no
Raspberry Pi 5 machine (and no model of its EEPROM bootloader or RP1), so nothing here boots:
what is checked is what the Pi 5 firmware reads (an MBR disk, FAT32-LBA partition 1 with
config.txt, cmdline.txt and the files they name) and that the kernel there is trixie-backports'
7.x with the Pi 5 device tree that has PCIe and RP1 (Ethernet, USB), its drivers in the root
and the board's storage drivers in the initramfs; and the kernel-update plumbing (apt pin,
run-parts for the kernel's hooks, the boot hook).

Run time: the rpi5 base is a copy of the shared bookworm base with trixie-backports' kernel
swapped in (no second debootstrap); see bench/RESULTS.md (os build) for the figures.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from provision.osimage import boothook, disk
from tests.e2e.os_images import BASE_ROLE_ONLY, claw_os, debugfs, fat_read, unpacked

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(3600),
    pytest.mark.skipif(shutil.which("dtc") is None,
                       reason="dtc is not installed (apt-get install device-tree-compiler)"),
]
DTB = "bcm2712-rpi-5-b.dtb"


@pytest.fixture(scope="module")
def rpi5_built(tmp_path_factory):
    out = tmp_path_factory.mktemp("rpi5")
    image = out / "rpi5.img"
    record = claw_os("build", "rpi5", "-o", str(image), "--size", "3G", "--hostname", "pi5",
                     *BASE_ROLE_ONLY)
    return image, record


def root_read(image: Path, layout: disk.Layout, command: str) -> str:
    return debugfs(image, layout, command).decode(errors="replace")


def test_rpi5_mbr_the_firmware_reads(rpi5_built):
    image, record = rpi5_built
    table = json.loads(subprocess.run(["sfdisk", "--json", str(image)], capture_output=True,
                                      text=True, check=True).stdout)["partitiontable"]
    assert table["label"] == "dos"
    boot, root = table["partitions"]
    assert boot["type"] == "c" and boot.get("bootable") and boot["start"] == 2048
    assert root["type"] == "83" and root["start"] == boot["start"] + boot["size"]
    disk_id = table["id"].removeprefix("0x")
    assert record["root_partuuid"] == f"{disk_id}-02"
    layout = disk.read_layout(image)
    assert disk.fs_type(image, layout.boot) == "vfat"
    fat = subprocess.run(["minfo", "-i", f"{image}@@{layout.boot.start}", "::"],
                         capture_output=True, text=True, check=True).stdout
    assert "FAT32" in fat or "fat_bits=32" in fat.replace(" ", ""), fat


def test_rpi5_config_names_what_is_there(rpi5_built):
    image, record = rpi5_built
    layout = disk.read_layout(image)
    config = fat_read(image, layout, "config.txt").decode()
    settings = [ln.strip() for ln in config.splitlines() if ln.strip() and ln[0] != "#"]
    assert settings == ["arm_64bit=1", "kernel=Image", "initramfs initrd.img followkernel",
                        f"device_tree={DTB}", "enable_uart=1"]
    cmdline = fat_read(image, layout, "cmdline.txt").decode()
    assert cmdline.count("\n") == 1 and cmdline.strip() == record["cmdline"]
    assert f"root=PARTUUID={record['root_partuuid']}" in cmdline.split()
    assert "console=ttyAMA10,115200" in cmdline.split() and "rootwait" in cmdline.split()

    kernel = fat_read(image, layout, "Image")
    assert kernel[0x38:0x3c] == b"ARM\x64"  # a raw arm64 Image: the firmware loads it as is
    boot = root_read(image, layout, "ls /boot")
    version = re.search(r"vmlinuz-(7\.[^\s\x00/]*-arm64)", boot)
    assert version, f"no 7.x kernel (trixie-backports) in the root's /boot: {boot}"
    assert "vmlinuz-6." not in boot  # the release's kernel was purged: one kernel, one initrd
    assert kernel == subprocess.run(
        ["debugfs", "-R", f"cat /boot/vmlinuz-{version[1]}", disk.at(image, layout.root)],
        capture_output=True, check=True).stdout

    cpio = unpacked(fat_read(image, layout, "initrd.img"))
    for module in (b"sdhci-brcmstb.ko", b"nvme.ko", b"rp1_pci.ko", b"dwc3.ko", b"ext4.ko"):
        assert module in cpio, f"{module!r} missing from the initramfs (os.initramfs_modules)"


def test_rpi5_device_tree_has_pcie_and_rp1(rpi5_built, tmp_path):
    """The tree the firmware hands the kernel: the Pi 5's, with the PCIe port RP1 sits on
    and RP1's Ethernet (macb) and USB (dwc3) enabled, the kernel package's own copy."""
    image, _ = rpi5_built
    layout = disk.read_layout(image)
    dtb = tmp_path / DTB
    dtb.write_bytes(fat_read(image, layout, DTB))
    dts = subprocess.run(["dtc", "-q", "-I", "dtb", "-O", "dts", str(dtb)], capture_output=True,
                         text=True, check=True).stdout
    assert 'compatible = "raspberrypi,5-model-b\\0brcm,bcm2712"' in dts
    pcie2 = dts[dts.index("pcie@1000120000 {"):]
    assert 'compatible = "brcm,bcm2712-pcie"' in pcie2[:2000]
    for node, compatible in (("ethernet@40100000", "raspberrypi,rp1-gem"),
                             ("usb@40200000", "snps,dwc3"), ("clocks@40018000",
                                                             "raspberrypi,rp1-clocks")):
        body = pcie2[pcie2.index(f"{node} {{"):]
        assert f'compatible = "{compatible}"' in body[:400], node
    eth = pcie2[pcie2.index("ethernet@40100000 {"):]
    assert 'status = "okay"' in eth[:eth.index("mdio")], "RP1 Ethernet is disabled"

    boot = root_read(image, layout, "ls /boot")
    version = re.search(r"vmlinuz-(7\.[^\s\x00/]*-arm64)", boot)[1]
    own = subprocess.run(["debugfs", "-R", f"cat /usr/lib/linux-image-{version}/broadcom/{DTB}",
                          disk.at(image, layout.root)], capture_output=True, check=True).stdout
    assert own == dtb.read_bytes()


def test_rpi5_root_has_the_board_drivers(rpi5_built):
    image, _ = rpi5_built
    layout = disk.read_layout(image)
    version = re.search(r"vmlinuz-(7\.[^\s\x00/]*-arm64)", root_read(image, layout, "ls /boot"))[1]
    kernel = f"/usr/lib/modules/{version}/kernel/drivers"
    for folder, module in (("misc/rp1", "rp1_pci.ko.xz"), ("net/ethernet/cadence", "macb.ko.xz"),
                           ("pinctrl", "pinctrl-rp1.ko.xz"), ("clk", "clk-rp1.ko.xz"),
                           ("irqchip", "irq-bcm2712-mip.ko.xz"),
                           ("mmc/host", "sdhci-brcmstb.ko.xz")):
        assert module in root_read(image, layout, f"ls {kernel}/{folder}"), module
    config = root_read(image, layout, f"cat /usr/lib/modules/{version}/config")
    assert "CONFIG_PCIE_BRCMSTB=y" in config


def test_rpi5_kernel_updates_reach_the_fat(rpi5_built):
    """apt keeps bookworm and follows trixie-backports' kernel; the kernel's hooks can run
    (run-parts over several directories) and the boot hook is in all three places, with the
    boot partition mounted where it writes."""
    image, record = rpi5_built
    layout = disk.read_layout(image)
    pin = root_read(image, layout, "cat /etc/apt/preferences.d/claw-trixie")
    assert "Pin: release n=trixie\nPin-Priority: 100" in pin
    sources = root_read(image, layout, "cat /etc/apt/sources.list")
    assert "trixie-backports main" in sources
    assert root_read(image, layout, f"cat /{boothook.RUN_PARTS_PATH}") == boothook.RUN_PARTS
    conf = root_read(image, layout, f"cat /{boothook.CONF_PATH}")
    assert "KERNEL=Image\n" in conf and f"DTB_NAME={DTB}\n" in conf
    for folder in boothook.HOOK_DIRS:
        assert "zz-claw-boot" in root_read(image, layout, f"ls /{folder}"), folder
    fstab = root_read(image, layout, "cat /etc/fstab")
    assert f"PARTUUID={record['root_partuuid']}\t/\text4" in fstab
    assert f"PARTUUID={record['boot_partuuid']}\t/boot/firmware\tvfat" in fstab


def test_rpi5_kernel_reinstall_refreshes_the_fat(tmp_path):
    """A kernel (re)installed with apt in a copy of the rpi5 root (under qemu-user): dpkg, on
    apt's PATH from 50claw-dpkg-path, runs the 7.x kernel's hooks through the run-parts shim
    (the /usr/share legacy-boot copy, initramfs-tools, zz-claw-boot) and the boot hook puts
    the kernel, initrd and device tree on a stand-in /boot/firmware. 2-3 min: apt fetches the
    1.9 kB linux-image package and the initrd is rebuilt under qemu-user."""
    from provision import vm
    from provision.osimage import rootfs
    from provision.profiles import ProfileStore

    profile = ProfileStore().get("rpi5")
    cached = rootfs.provisioned_root(profile, {}, lambda _: None, tags=["base"])
    root = tmp_path / "root"
    try:
        rootfs.copy_tree(cached, root)
        boothook.install(root, profile)
        fat = root / "boot/firmware"
        fat.mkdir(parents=True, exist_ok=True)
        (fat / "Image").write_bytes(b"the kernel before")
        version = re.search(r"^vmlinuz-(7\..*)$", "\n".join(
            p.name for p in (root / "boot").iterdir()), re.M)[1]
        log = tmp_path / "apt.log"
        with rootfs.chroot_session(root):
            vm._run(["chroot", str(root), "env", "DEBIAN_FRONTEND=noninteractive",
                     "LC_ALL=C.UTF-8", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "apt-get",
                     "install", "-y", "--reinstall", f"linux-image-{version}"], log,
                    "apt-get install --reinstall", timeout=1800)
        out = log.read_text()
        assert "run-parts: missing operand" not in out
        assert re.search(r"^/tmp/tmp\.\w+/zz-claw-boot:$", out, re.M), out[-3000:]  # merged
        assert f"claw-boot: /boot/firmware boots {version}" in out
        assert (fat / "Image").read_bytes() == (root / f"boot/vmlinuz-{version}").read_bytes()
        assert (fat / "initrd.img").read_bytes() == (
            root / f"boot/initrd.img-{version}").read_bytes()
        assert (fat / DTB).read_bytes() == (
            root / f"usr/lib/linux-image-{version}/broadcom/{DTB}").read_bytes()
        assert (fat / "claw-kernel.txt").read_text().strip() == version
    finally:
        rootfs.remove_tree(root)
