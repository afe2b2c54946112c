"""`claw os build generic-arm64` end to end: the image boots as a UEFI board would, through
QEMU's UEFI firmware (Debian's qemu-efi-aarch64), the removable-media BOOTAA64.EFI on its ESP
and GRUB's grub.cfg there, root by PARTUUID; then SSH in and check hostname and the grown root.

The board is a profile that `extends: generic-arm64` and names its drivers as a real board's
profile would (`os.initramfs_modules: []`: QEMU needs only the base's virtio list), so the cold
root skips generic-arm64's MODULES=most initramfs, which alone takes 5-10 min under qemu-user
and tests nothing about the boot chain (board_initramfs's choice is unit-tested).
Run time: the root shares the qemu-virt base (one debootstrap); with the roots cached the build
is ~15 s and the UEFI boot to SSH ~1 min under TCG.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from provision import vm as vms
from tests.e2e.os_images import BASE_ROLE_ONLY, claw_os, login_key, sh, user_profiles
from tests.e2e.os_images import booted as booted_vm

FIRMWARE = Path("/usr/share/qemu-efi-aarch64/QEMU_EFI.fd")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(3600),  # a cold base root (debootstrap under qemu-user) ~15 min
    pytest.mark.skipif(shutil.which(vms.QEMU) is None,
                       reason=f"{vms.QEMU} is not installed (apt-get install qemu-system-arm)"),
    pytest.mark.skipif(not FIRMWARE.exists(),
                       reason=f"{FIRMWARE} is missing (apt-get install qemu-efi-aarch64)"),
]
HOSTNAME, USER = "claw-e2e-uefi", "clawops"
IMAGE_SIZE, DISK_SIZE = 3 << 30, 4 << 30
PROFILE = """\
# A UEFI board whose storage drivers are known: QEMU's virt machine (virtio, in the base's list).
name: qemu-uefi
extends: generic-arm64
description: QEMU virt booted through UEFI firmware and GRUB (the boot-tested UEFI board)
os:
  initramfs_modules: []
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("uefi")
    env = user_profiles(out, {"qemu-uefi": PROFILE})
    key = login_key(out)
    image = out / "qemu-uefi.img"
    record = claw_os("build", "qemu-uefi", "-o", str(image), "--size", "3G", "--hostname",
                     HOSTNAME, "--user", USER, "--ssh-key", f"{key}.pub", *BASE_ROLE_ONLY,
                     env=env)
    return image, key, record


@pytest.fixture(scope="module")
def booted(built):
    image, key, _ = built
    with booted_vm(vms.VmImage(FIRMWARE, FIRMWARE, image), "claw-os-uefi-e2e", user=USER,
                   key=key, disk_size=DISK_SIZE, firmware=FIRMWARE, boot_timeout=600) as vm:
        yield vm


def test_esp_holds_grub_for_the_removable_path(built):
    image, _, record = built
    assert "EFI/BOOT/BOOTAA64.EFI" in record["boot"] and "EFI/BOOT/grub.cfg" in record["boot"]
    esp = f"{image}@@{1 << 20}"
    efi = subprocess.run(["mtype", "-i", esp, "::/EFI/BOOT/BOOTAA64.EFI"], capture_output=True,
                         check=True).stdout
    assert efi[:2] == b"MZ"  # a PE/COFF EFI application
    cfg = subprocess.run(["mtype", "-i", esp, "::/EFI/BOOT/grub.cfg"], capture_output=True,
                         text=True, check=True).stdout
    assert f"root=PARTUUID={record['root_partuuid']}" in cfg and "initrd /initrd.img" in cfg


def test_boots_through_uefi_and_grub(booted, built):
    _, _, record = built
    assert sh(booted, "hostname") == HOSTNAME
    assert sh(booted, "test -d /sys/firmware/efi && echo uefi") == "uefi"
    cmdline = sh(booted, "cat /proc/cmdline")
    assert f"root=PARTUUID={record['root_partuuid']}" in cmdline
    assert cmdline.startswith("BOOT_IMAGE=/vmlinuz")  # GRUB's `linux` puts it there


def test_root_grew_to_the_disk(booted):
    deadline = time.monotonic() + 120
    while sh(booted, "systemctl is-active claw-grow-root.service || true") != "active":
        assert time.monotonic() < deadline, sh(booted, "systemctl status claw-grow-root || true")
        time.sleep(5)
    size = int(sh(booted, "findmnt -bno SIZE /"))
    assert size > 3.5 * 2**30, size  # the 3 GiB image on a 4 GiB disk
