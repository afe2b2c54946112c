"""`claw os build/customize` bad input: one line, exit 2, nothing written, and refused before
any root filesystem is built. Also the pure parts: sizes, the GPT plan, the Wi-Fi key."""

from __future__ import annotations

import hashlib

import pytest

from provision.errors import BadInput
from provision.osimage import disk, firstboot
from provision.osimage.build import kernel_cmdline, load_profile, parse_size

pytestmark = pytest.mark.unit


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "keys" / "id.pub"
    path.parent.mkdir()
    path.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBxYZ test@claw\n")
    return path


@pytest.mark.parametrize("args, expected", [
    (["no-such-board"], "no-such-board"),
    (["rpi5", "--u-boot", "none"], "boots with rpi-firmware, not U-Boot"),
    (["qemu-virt", "--size", "4Q"], "--size '4Q'"),
    (["qemu-virt", "--size", "100M"], "expected between 1G and 1T"),
    (["qemu-virt", "--ssh-key", "/nonexistent/id.pub", "--user", "a"], "cannot read it"),
    (["qemu-virt", "--wifi", "lab-no-passphrase"], "expected SSID:PASSPHRASE"),
    (["qemu-virt", "--wifi", "lab:short"], "expected SSID:PASSPHRASE"),
    (["qemu-virt", "--hostname", "Bad_Name"], "--hostname 'Bad_Name'"),
    (["qemu-virt", "--user", "root"], "--user 'root'"),
    (["qemu-virt", "-e", "no-equals"], "-e 'no-equals'"),
    (["qemu-virt", "--tags", "zram,frobnicate"], "--tags frobnicate"),
    (["qemu-virt", "--compress", "bz2"], "--compress 'bz2'"),
    (["qemu-virt", "--preload-image", "claw-no-such-image:never"], "--preload-image"),
])
def test_build_bad_input(claw, tmp_path, args, expected):
    out = tmp_path / "out"
    out.mkdir()
    result = claw("os", "build", *args, "-o", str(out / "dev.img"))
    assert result.code == 2, result
    assert expected in result.err and "Traceback" not in result.err
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert list(out.iterdir()) == []


def test_build_key_problems(claw, tmp_path, key):
    assert "needs --user" in claw("os", "build", "qemu-virt", "--ssh-key", str(key), "-o",
                                  str(tmp_path / "a.img")).err
    private = tmp_path / "id"
    private.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    result = claw("os", "build", "qemu-virt", "--user", "ops", "--ssh-key", str(private), "-o",
                  str(tmp_path / "a.img"))
    assert result.code == 2 and "not an OpenSSH public key" in result.err
    assert not (tmp_path / "a.img").exists()


def test_build_output_dir_missing(claw, tmp_path):
    result = claw("os", "build", "qemu-virt", "-o", str(tmp_path / "nope" / "dev.img"))
    assert result.code == 2 and "does not exist" in result.err
    result = claw("os", "build", "qemu-virt", "-o", str(tmp_path / "dev.img.zst"))
    assert result.code == 2 and "name the raw image" in result.err


def test_customize_bad_input(claw, tmp_path):
    result = claw("os", "customize", str(tmp_path / "missing.img"), "-o", str(tmp_path / "o.img"))
    assert result.code == 2 and "no such image" in result.err
    base = tmp_path / "base.img"
    base.write_bytes(b"\0" * 4096)
    result = claw("os", "customize", str(base), "-o", str(base))
    assert result.code == 2 and "is the base image" in result.err
    result = claw("os", "customize", str(base), "-o", str(tmp_path / "o.img"), "--profile",
                  "qemu-virt", "--wifi", "x")
    assert result.code == 2 and "--wifi" in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.img"]


def test_sizes():
    assert parse_size("4G") == 4 << 30
    assert parse_size("3500M") == 3500 << 20
    assert parse_size("8GiB") == 8 << 30
    assert parse_size(str(2 << 30)) == 2 << 30
    with pytest.raises(BadInput):
        parse_size("-1G")


def test_gpt_plan_is_aligned_and_leaves_room_for_the_backup_table():
    layout = disk.plan_gpt(4 << 30, 64)
    assert layout.boot.start == disk.MIB and layout.boot.size == 64 * disk.MIB
    assert layout.root.start == layout.boot.end and layout.root.start % disk.MIB == 0
    assert layout.root.end == (4 << 30) - disk.MIB
    assert layout.root.type == disk.ROOT_ARM64_TYPE and layout.boot.type == disk.ESP_TYPE
    assert layout.root.uuid != layout.boot.uuid


def test_kernel_cmdline_names_the_root_partition():
    profile = load_profile("qemu-virt")
    line = kernel_cmdline(profile, "1234-abcd")
    assert "root=PARTUUID=1234-abcd" in line and "console=ttyAMA0,115200" in line


def test_wifi_config_carries_the_derived_key_not_the_passphrase(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    firstboot._network(root, ("claw-lab", "correct horse battery"))
    conf = (root / "etc/wpa_supplicant/wpa_supplicant-wlan0.conf").read_text()
    psk = hashlib.pbkdf2_hmac("sha1", b"correct horse battery", b"claw-lab", 4096, 32).hex()
    assert f"psk={psk}" in conf and "correct horse" not in conf
    assert f"ssid={b'claw-lab'.hex()}" in conf
    assert (root / "etc/systemd/network/25-wireless.network").is_file()


def test_cached_roots_are_pruned_to_the_most_recently_used(tmp_path, monkeypatch):
    import os

    from provision.osimage import rootfs

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    for i in range(5):
        meta = rootfs.roots_dir() / f"provisioned-qemu-virt-{i:012d}" / "meta.json"
        meta.parent.mkdir(parents=True)
        meta.write_text("{}")
        os.utime(meta, (1000 + i, 1000 + i))
    other = rootfs.roots_dir() / "provisioned-rpi5-000000000000" / "meta.json"
    other.parent.mkdir()
    other.write_text("{}")
    os.utime(other, (1, 1))  # oldest of all, but of another kind
    rootfs._prune("provisioned-qemu-virt-000000000004")
    left = sorted(p.name for p in rootfs.roots_dir().iterdir())
    assert left == ["provisioned-qemu-virt-000000000002", "provisioned-qemu-virt-000000000003",
                    "provisioned-qemu-virt-000000000004", "provisioned-rpi5-000000000000"]


def test_publish_moves_the_set_and_drops_a_stale_compressed_copy(tmp_path):
    from provision.osimage.build import publish

    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    (out / "dev.img.zst").write_text("from an earlier build")
    produced = [work / "dev.img.bmap", work / "dev.img.sha256", work / "dev.img"]
    for path in produced:
        path.write_text(path.name)
    files = publish(produced, out)
    assert [f.name for f in files] == ["dev.img.bmap", "dev.img.sha256", "dev.img"]
    assert sorted(p.name for p in out.iterdir()) == ["dev.img", "dev.img.bmap", "dev.img.sha256"]
    assert list(work.iterdir()) == []


def test_esp_files_land_in_their_folders(tmp_path):
    """The ESP layout a UEFI profile needs (EFI/BOOT/…) made by mtools in a real FAT, beside
    the kernel files at its top; the grub.cfg boots those with root by PARTUUID."""
    import subprocess

    from provision.osimage.build import grub_config

    disk.check_tools("mkfs.vfat", "mcopy")
    image = tmp_path / "esp.img"
    esp_size = 64 * disk.MIB
    with open(image, "wb") as f:
        f.truncate(esp_size + disk.MIB)
    part = disk.Partition(1, disk.MIB, esp_size, disk.ESP_TYPE, "x")
    cfg = tmp_path / "grub.cfg"
    cfg.write_text(grub_config("root=PARTUUID=abcd rw"))
    efi = tmp_path / "BOOTAA64.EFI"
    efi.write_bytes(b"MZ" + bytes(100))
    disk.make_fat(image, part, "CLAW-BOOT", {"cmdline.txt": cfg, "EFI/BOOT/BOOTAA64.EFI": efi,
                                             "EFI/BOOT/grub.cfg": cfg})
    disk.fill_fat(image, part, {"EFI/BOOT/grub.cfg": cfg})  # folders already there: fine
    listing = subprocess.run(["mdir", "-b", "-/", "-i", f"{image}@@{disk.MIB}", "::/"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert {"::/cmdline.txt", "::/EFI/BOOT/BOOTAA64.EFI", "::/EFI/BOOT/grub.cfg"} <= set(listing)
    text = subprocess.run(["mtype", "-i", f"{image}@@{disk.MIB}", "::/EFI/BOOT/grub.cfg"],
                          capture_output=True, text=True, check=True).stdout
    assert "linux /vmlinuz root=PARTUUID=abcd rw" in text and "initrd /initrd.img" in text
