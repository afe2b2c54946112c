"""`claw os build` for U-Boot boards, end to end: the U-Boot boot chain boots. A profile
extending qemu-virt with `bootloader: u-boot` is built through the real CLI and booted by
Debian's U-Boot for QEMU (u-boot-qemu's qemu_arm64 as -bios), which finds
extlinux/extlinux.conf on the FAT partition by its standard boot, loads the Image and initrd
and mounts the root by label; then SSH in. (The rk3588 image's structure:
test_os_build_rk3588.py.)

Run time: the U-Boot qemu-virt root shares the qemu-virt base; its own part (copy + the base
role) took 89 s cold here (load ~15 on 2 cores). Cached: the build ~10 s, U-Boot boot to SSH
~100 s under TCG.
"""


from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from provision import vm as vms
from tests.e2e.os_images import BASE_ROLE_ONLY, claw_os, login_key, sh, user_profiles
from tests.e2e.os_images import booted as booted_vm

U_BOOT_QEMU = Path("/usr/lib/u-boot/qemu_arm64/u-boot.bin")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(3600),
    pytest.mark.skipif(shutil.which(vms.QEMU) is None,
                       reason=f"{vms.QEMU} is not installed (apt-get install qemu-system-arm)"),
    pytest.mark.skipif(not U_BOOT_QEMU.exists(),
                       reason=f"{U_BOOT_QEMU} is missing (apt-get install u-boot-qemu)"),
]
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


@pytest.fixture(scope="module")
def virt_built(tmp_path_factory):
    out = tmp_path_factory.mktemp("uboot")
    env = user_profiles(out, {"qemu-virt-uboot": PROFILE})
    key = login_key(out)
    image = out / "virt-uboot.img"
    record = claw_os("build", "qemu-virt-uboot", "-o", str(image), "--size", "3G", "--hostname",
                     HOSTNAME, "--user", USER, "--ssh-key", f"{key}.pub", "--u-boot", "none",
                     *BASE_ROLE_ONLY, env=env)
    return image, key, record


@pytest.fixture(scope="module")
def booted(virt_built):
    image, key, _ = virt_built
    with booted_vm(vms.VmImage(U_BOOT_QEMU, U_BOOT_QEMU, image), "claw-os-uboot-e2e", user=USER,
                   key=key, disk_size=4 << 30, firmware=U_BOOT_QEMU, boot_timeout=600) as vm:
        yield vm


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


def test_initramfs_update_reaches_the_boot_partition(booted):
    """The boot hook (boothook.py) on a running board: what update-initramfs runs once it has
    written an initrd (`run-parts --arg=VERSION --arg=INITRD /etc/initramfs/post-update.d`)
    copies the kernel, the initrd and the version (claw-kernel.txt, which only the hook
    writes) to the mounted FAT partition extlinux.conf is read from. (`update-initramfs -u`
    itself passed here too, but takes 81 s under TCG.)"""
    assert sh(booted, "findmnt -no FSTYPE /boot/firmware") == "vfat"
    assert sh(booted, "sudo test -e /boot/firmware/claw-kernel.txt || echo absent") == "absent"
    version = sh(booted, "uname -r")
    started = time.monotonic()
    out = sh(booted, f"sudo run-parts --report --arg={version} --arg=/boot/initrd.img-{version} "
                     "/etc/initramfs/post-update.d 2>&1")
    print(f"initramfs post-update hooks: {time.monotonic() - started:.0f} s")
    assert f"claw-boot: /boot/firmware boots {version}" in out, out
    fat, own = sh(booted, f"sudo sha256sum /boot/firmware/initrd.img /boot/initrd.img-{version}"
                          " | cut -d' ' -f1").split()
    assert fat == own
    assert sh(booted, "sudo cat /boot/firmware/claw-kernel.txt") == version  # the hook's mark
    assert sh(booted, f"sudo cmp /boot/firmware/Image /boot/vmlinuz-{version} "
                      "&& echo same") == "same"
