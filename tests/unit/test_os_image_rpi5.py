"""`claw os build rpi5` without building: the MBR layout the Pi firmware reads, config.txt and
cmdline.txt, the boot files taken from a root, the apt pin that keeps a bookworm root on
bookworm with trixie-backports' kernel, and the kernel hook that refreshes the FAT partition
(run for real with /bin/sh on a fake root)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from provision.osimage import boothook, disk, rootfs, rpi
from provision.osimage.build import kernel_cmdline, load_profile
from provision.profiles import ProfileStore

pytestmark = pytest.mark.unit

IMAGE = b"MZ" + bytes(0x36) + b"ARM\x64" + bytes(range(256)) * 16  # an arm64 Image header
PI_DTB = "broadcom/bcm2712-rpi-5-b.dtb"


def test_mbr_layout_the_firmware_reads(tmp_path):
    layout = disk.plan_mbr(1 << 30, 512)
    assert layout.label == "dos" and layout.boot.type == "c" and layout.root.type == "83"
    disk_id = layout.boot.uuid[:8]
    assert layout.boot.uuid == f"{disk_id}-01" and layout.root.uuid == f"{disk_id}-02"
    image = tmp_path / "pi.img"
    with open(image, "wb") as out:
        out.truncate(layout.size)
    disk.write_partition_table(image, layout)
    table = json.loads(subprocess.run(["sfdisk", "--json", str(image)], capture_output=True,
                                      text=True, check=True).stdout)["partitiontable"]
    assert table["label"] == "dos" and table["id"] == f"0x{disk_id}"
    first, second = table["partitions"]
    assert (first["start"], first["size"], first["type"], first.get("bootable")) == (
        2048, 512 * 2048, "c", True)
    assert second["start"] == first["start"] + first["size"] and second["type"] == "83"
    assert second["start"] + second["size"] == layout.size // 512
    assert image.read_bytes()[510:512] == b"\x55\xaa"


def test_mbr_too_small():
    with pytest.raises(Exception, match="expected at least 256 MiB"):
        disk.plan_mbr(600 << 20, 512)


def test_config_and_cmdline():
    pi = load_profile("rpi5")
    assert pi.os.bootloader == "rpi-firmware" and pi.os.kernel_suite == "trixie-backports"
    lines = [ln for ln in rpi.config_txt(pi).splitlines() if not ln.startswith("#")]
    assert lines == ["arm_64bit=1", "kernel=Image", "initramfs initrd.img followkernel",
                     "device_tree=bcm2712-rpi-5-b.dtb", "enable_uart=1"]
    assert kernel_cmdline(pi, "1a2b3c4d-02") == (
        "root=PARTUUID=1a2b3c4d-02 rw rootwait console=ttyAMA10,115200 net.ifnames=0")


def test_boot_files_from_a_root(tmp_path):
    root, work = tmp_path / "root", tmp_path / "work"
    work.mkdir()
    version = "7.3.4+deb13-arm64"
    kernel, initrd = root / f"boot/vmlinuz-{version}", root / f"boot/initrd.img-{version}"
    kernel.parent.mkdir(parents=True)
    kernel.write_bytes(IMAGE)
    initrd.write_bytes(b"initrd")
    dtb = root / f"usr/lib/linux-image-{version}" / PI_DTB
    dtb.parent.mkdir(parents=True)
    dtb.write_bytes(b"\xd0\x0d\xfe\xed" + b"tree")
    files = rpi.boot_files(root, work, load_profile("rpi5"), kernel, initrd,
                           "root=PARTUUID=1a2b3c4d-02 rw")
    assert sorted(files) == ["Image", "bcm2712-rpi-5-b.dtb", "cmdline.txt", "config.txt",
                             "initrd.img"]
    assert files["Image"].read_bytes() == IMAGE and files["bcm2712-rpi-5-b.dtb"] == dtb
    assert files["cmdline.txt"].read_text() == "root=PARTUUID=1a2b3c4d-02 rw\n"


def test_trixie_kernel_pin():
    """trixie-backports on bookworm: trixie's sources pinned at 100 (like a backports suite),
    so `apt upgrade` follows the kernel but takes nothing else from trixie."""
    assert rootfs.kernel_release("trixie-backports") == "trixie"
    assert rootfs.kernel_release("bookworm-backports") is None
    pin = rootfs.release_pin("trixie")
    records = [dict(ln.split(": ", 1) for ln in block.splitlines() if not ln.startswith("#"))
               for block in pin.strip().split("\n\n")]
    assert records == [{"Package": "*", "Pin": "release n=trixie", "Pin-Priority": "100"}]
    store = ProfileStore()
    pi, rk = store.get("rpi5"), store.get("rk3588")
    assert rootfs.base_key(pi).startswith("base-bookworm-trixie-backports-arm64-")
    assert rootfs.base_key(rk).startswith("base-bookworm-backports-arm64-")
    # both start from the same debootstrap: the release's base
    assert (rootfs.base_key(rootfs.release_kernel(pi))
            == rootfs.base_key(rootfs.release_kernel(rk)))


def fake_root(tmp_path: Path, versions: dict[str, bool]) -> Path:
    """/boot with a vmlinuz (and an initrd where `versions` says) per kernel version, the
    device tree in each kernel's package directory."""
    root = tmp_path / "root"
    (root / "boot").mkdir(parents=True)
    for version, has_initrd in versions.items():
        (root / f"boot/vmlinuz-{version}").write_bytes(IMAGE + version.encode())
        if has_initrd:
            (root / f"boot/initrd.img-{version}").write_bytes(b"initrd " + version.encode())
        dtb = root / f"usr/lib/linux-image-{version}" / PI_DTB
        dtb.parent.mkdir(parents=True)
        dtb.write_bytes(b"dtb " + version.encode())
    return root


def run_hook(tmp_path: Path, root: Path, boot: Path, profile: str = "rpi5"):
    conf = tmp_path / "boot.conf"
    conf.write_text(boothook.config(ProfileStore().get(profile), str(boot), str(root)))
    script = tmp_path / "claw-boot-update"
    script.write_text(boothook.SCRIPT)
    env = {**os.environ, "CLAW_BOOT_CONF": str(conf)}
    return subprocess.run(["sh", str(script), "7.3.4+deb13-arm64", "/boot/vmlinuz"], env=env,
                          capture_output=True, text=True)


def test_hook_copies_the_newest_kernel(tmp_path):
    """7.10 sorts after 7.3 (version order, not text order); a kernel without its initrd yet
    waits for the initramfs hook."""
    root = fake_root(tmp_path, {"7.3.4+deb13-arm64": True, "7.10.1+deb13-arm64": True,
                                "7.11.0+deb13-arm64": False})
    boot = tmp_path / "fat"
    boot.mkdir()
    (boot / "Image").write_bytes(b"old")
    (boot / "config.txt").write_text("kernel=Image\n")
    done = run_hook(tmp_path, root, boot)
    assert done.returncode == 0, done.stderr
    assert "boots 7.10.1+deb13-arm64" in done.stdout
    assert (boot / "Image").read_bytes() == IMAGE + b"7.10.1+deb13-arm64"
    assert (boot / "initrd.img").read_bytes() == b"initrd 7.10.1+deb13-arm64"
    assert (boot / "bcm2712-rpi-5-b.dtb").read_bytes() == b"dtb 7.10.1+deb13-arm64"
    assert (boot / "config.txt").read_text() == "kernel=Image\n"  # names fixed: not rewritten
    assert sorted(p.name for p in boot.iterdir()) == [
        "Image", "bcm2712-rpi-5-b.dtb", "claw-kernel.txt", "config.txt", "initrd.img"]


def test_hook_u_boot_layout_and_gzip(tmp_path):
    """rk3588: dtbs/<vendor>/<board>.dtb beside extlinux.conf; a gzipped kernel unpacked."""
    import gzip

    version = "6.12.95+deb12-arm64"
    root = tmp_path / "root"
    (root / "boot").mkdir(parents=True)
    (root / f"boot/vmlinuz-{version}").write_bytes(gzip.compress(IMAGE))
    (root / f"boot/initrd.img-{version}").write_bytes(b"initrd")
    dtb = root / f"usr/lib/linux-image-{version}/rockchip/rk3588-rock-5b.dtb"
    dtb.parent.mkdir(parents=True)
    dtb.write_bytes(b"rk dtb")
    boot = tmp_path / "fat"
    boot.mkdir()
    (boot / "Image").write_bytes(b"old")
    done = run_hook(tmp_path, root, boot, "rk3588")
    assert done.returncode == 0, done.stderr
    assert (boot / "Image").read_bytes() == IMAGE
    assert (boot / "dtbs/rockchip/rk3588-rock-5b.dtb").read_bytes() == b"rk dtb"


def test_hook_refuses_an_unmounted_boot_partition(tmp_path):
    root = fake_root(tmp_path, {"7.3.4+deb13-arm64": True})
    boot = tmp_path / "fat"
    boot.mkdir()
    done = run_hook(tmp_path, root, boot)
    assert done.returncode == 1 and "is the boot partition mounted?" in done.stderr
    assert list(boot.iterdir()) == []


def test_hook_installed_in_three_places(tmp_path):
    root = tmp_path / "root"
    boothook.install(root, ProfileStore().get("rpi5"))
    script = root / boothook.SCRIPT_PATH
    assert os.access(script, os.X_OK) and script.read_text() == boothook.SCRIPT
    for folder in boothook.HOOK_DIRS:
        assert os.readlink(root / folder / "zz-claw-boot") == f"/{boothook.SCRIPT_PATH}"
    conf = (root / boothook.CONF_PATH).read_text()
    assert "BOOT=/boot/firmware\n" in conf and f"DTB={PI_DTB}\n" in conf
    assert "PREFIX" not in conf
    syntax = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


def test_run_parts_takes_several_directories(tmp_path):
    """The trixie-backports kernel's linux-run-hooks hands run-parts /etc/kernel/X.d and
    /usr/share/kernel/X.d: the shim runs them on this host's bookworm run-parts (5.7, one
    directory) in one name order, a name in the first directory hiding the second's."""
    first, second = tmp_path / "etc", tmp_path / "usr"
    for folder, names in ((first, ["initramfs-tools", "zz-claw-boot"]),
                          (second, ["00-legacy-boot", "initramfs-tools"])):
        folder.mkdir()
        for name in names:
            script = folder / name
            script.write_text(f"#!/bin/sh\necho {folder.name}/{name} \"$@\"\n")
            script.chmod(0o755)
    shim = tmp_path / "run-parts"
    shim.write_text(boothook.RUN_PARTS)
    done = subprocess.run(["sh", str(shim), "--exit-on-error", "--arg=7.3.4+deb13-arm64",
                           "--arg=/boot/vmlinuz-7.3.4+deb13-arm64", str(first), str(second)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "usr/00-legacy-boot 7.3.4+deb13-arm64 /boot/vmlinuz-7.3.4+deb13-arm64",
        "etc/initramfs-tools 7.3.4+deb13-arm64 /boot/vmlinuz-7.3.4+deb13-arm64",
        "etc/zz-claw-boot 7.3.4+deb13-arm64 /boot/vmlinuz-7.3.4+deb13-arm64"]
    one = subprocess.run(["sh", str(shim), "--list", str(second)], capture_output=True,
                         text=True)
    assert one.returncode == 0 and one.stdout.split() == [str(second / "00-legacy-boot"),
                                                          str(second / "initramfs-tools")]
    failing = second / "01-fails"
    failing.write_text("#!/bin/sh\nexit 3\n")
    failing.chmod(0o755)
    done = subprocess.run(["sh", str(shim), "--exit-on-error", str(first), str(second)],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "etc/zz-claw-boot" not in done.stdout
