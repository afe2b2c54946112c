"""U-Boot boards (rk3588) in `claw os build`: the --u-boot binary is checked before any root is
built, the layout leaves room for it, it lands at sector 64 without touching the GPT, and the
extlinux.conf names what U-Boot needs."""

from __future__ import annotations

import gzip
import json
import subprocess

import pytest

from provision.errors import BadInput, ClawError
from provision.osimage import disk, uboot
from provision.osimage.build import kernel_cmdline, load_profile
from provision.profiles import ProfileStore

pytestmark = pytest.mark.unit


def rockchip_bin(size: int = uboot.ITB_OFFSET + 4096) -> bytes:
    """The shape of a u-boot-rockchip.bin: RKNS idbloader at 0, a FIT at 0x7f8000."""
    data = bytearray(size)
    data[:4] = uboot.RKNS
    data[uboot.ITB_OFFSET:uboot.ITB_OFFSET + 4] = uboot.FDT_MAGIC
    data[100:108] = b"idbloadr"
    return bytes(data)


@pytest.mark.parametrize("extra, expected", [
    ([], "--u-boot is required: Debian builds no U-Boot for Rockchip RK3588"),
    (["--u-boot", "/nonexistent/u-boot-rockchip.bin"], "no such file"),
])
def test_rk3588_needs_its_u_boot(claw, tmp_path, extra, expected):
    result = claw("os", "build", "rk3588", "-o", str(tmp_path / "rk.img"), *extra)
    assert result.code == 2, result
    assert expected in result.err and "Traceback" not in result.err
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("data, expected", [
    (b"\0" * 4096, "no RKNS header"),
    (uboot.RKNS + b"\0" * 4096, "no u-boot.itb (FIT) at 0x7f8000"),
    (rockchip_bin(uboot.MAX_SIZE + 512), "does not fit before the first partition"),
])
def test_bad_u_boot_binaries(claw, tmp_path, data, expected):
    loader = tmp_path / "u-boot-rockchip.bin"
    loader.write_bytes(data)
    result = claw("os", "build", "rk3588", "-o", str(tmp_path / "rk.img"), "--u-boot",
                  str(loader))
    assert result.code == 2 and expected in result.err, result
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u-boot-rockchip.bin"]


def test_u_boot_refused_for_other_bootloaders(claw, tmp_path):
    result = claw("os", "build", "qemu-virt", "-o", str(tmp_path / "q.img"), "--u-boot", "none")
    assert result.code == 2 and "boots with direct-kernel, not U-Boot" in result.err


def test_loader_accepted_and_written_at_sector_64(tmp_path):
    rk3588 = load_profile("rk3588")
    path = tmp_path / "u-boot-rockchip.bin"
    path.write_bytes(rockchip_bin())
    loader = uboot.read_loader(str(path), rk3588)
    assert loader is not None and loader.data == path.read_bytes()
    assert uboot.read_loader("none", rk3588) is None

    layout = disk.plan_gpt(1 << 30, rk3588.os.boot_partition_mb, uboot.FIRST_PARTITION_MB)
    assert layout.boot.start == 16 << 20 >= uboot.OFFSET + uboot.MAX_SIZE
    image = tmp_path / "rk.img"
    with open(image, "wb") as out:
        out.truncate(layout.size)
    disk.write_partition_table(image, layout, legacy_boot=True)
    uboot.write_loader(image, loader)
    raw = image.read_bytes()[:layout.boot.start]
    assert raw[uboot.OFFSET:uboot.OFFSET + len(loader.data)] == loader.data
    assert raw[512:520] == b"EFI PART"  # the primary GPT is untouched
    table = json.loads(subprocess.run(["sfdisk", "--json", str(image)], capture_output=True,
                                      text=True, check=True).stdout)["partitiontable"]
    first, second = table["partitions"]
    assert first["start"] == 32768 and first.get("attrs") == "LegacyBIOSBootable"
    assert "attrs" not in second and second["start"] == first["start"] + first["size"]


def test_loader_only_for_rockchip(tmp_path):
    path = tmp_path / "u-boot.bin"
    path.write_bytes(rockchip_bin())
    virt = ProfileStore().get("qemu-virt")
    with pytest.raises(BadInput, match="known for Rockchip RK35xx boards"):
        uboot.read_loader(str(path), virt)


def test_extlinux_config():
    rk3588 = load_profile("rk3588")
    cmdline = kernel_cmdline(rk3588, "ignored-partuuid")
    assert cmdline == "root=LABEL=claw-root rw rootwait console=ttyS2,1500000 net.ifnames=0"
    conf = uboot.extlinux_config(cmdline, rk3588.os.dtb)
    lines = [ln.split() for ln in conf.splitlines() if ln.strip() and not ln.startswith("#")]
    assert ["default", "claw"] in lines and ["label", "claw"] in lines
    assert ["linux", "/Image"] in lines and ["initrd", "/initrd.img"] in lines
    assert ["fdt", "/dtbs/rockchip/rk3588-rock-5b.dtb"] in lines
    assert ["append", *cmdline.split()] in lines
    assert "fdt" not in uboot.extlinux_config(cmdline, None)


@pytest.mark.parametrize("gzipped", [False, True])
def test_boot_files_from_a_root(tmp_path, gzipped):
    """The Image is the vmlinuz (Debian's is already an Image; a gzipped one is unpacked);
    the dtb comes from the kernel's own package."""
    root, work = tmp_path / "root", tmp_path / "work"
    work.mkdir()
    (root / "boot").mkdir(parents=True)
    image = b"MZ" + bytes(0x36) + b"ARM\x64" + bytes(range(256)) * 64  # arm64 Image header
    kernel = root / "boot/vmlinuz-6.12.95+deb12-arm64"
    kernel.write_bytes(gzip.compress(image) if gzipped else image)
    initrd = root / "boot/initrd.img-6.12.95+deb12-arm64"
    initrd.write_bytes(b"initrd")
    rk3588 = load_profile("rk3588")
    with pytest.raises(ClawError, match=r"has no device tree rockchip/rk3588-rock-5b\.dtb"):
        uboot.boot_files(root, work, rk3588, kernel, initrd, "root=LABEL=claw-root")
    dtb = root / "usr/lib/linux-image-6.12.95+deb12-arm64/rockchip/rk3588-rock-5b.dtb"
    dtb.parent.mkdir(parents=True)
    dtb.write_bytes(uboot.FDT_MAGIC + b"tree")
    files = uboot.boot_files(root, work, rk3588, kernel, initrd, "root=LABEL=claw-root")
    assert sorted(files) == ["Image", "dtbs/rockchip/rk3588-rock-5b.dtb",
                             "extlinux/extlinux.conf", "initrd.img"]
    assert files["Image"].read_bytes() == image and files["dtbs/rockchip/rk3588-rock-5b.dtb"] == dtb


def test_board_initramfs():
    """A board that names its modules gets a quick MODULES=list build; other real boards
    every storage driver; QEMU the base's virtio list."""
    from provision.osimage.rootfs import board_initramfs

    store = ProfileStore()
    assert board_initramfs(store.get("rk3588"))[:3] == ["dw_mmc-rockchip", "sdhci-of-dwcmshc",
                                                        "nvme"]
    assert board_initramfs(store.get("generic-arm64")) == "most"
    assert board_initramfs(store.get("qemu-virt")) is None
    virt = store.get("qemu-virt")
    os_uboot = virt.os.model_copy(update={"bootloader": "u-boot", "initramfs_modules": []})
    assert board_initramfs(virt.model_copy(update={"os": os_uboot})) is None
    os_most = virt.os.model_copy(update={"bootloader": "u-boot"})
    assert board_initramfs(virt.model_copy(update={"os": os_most})) == "most"
