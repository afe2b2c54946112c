"""Boot for `u-boot` profiles (rk3588): the board's U-Boot in the gap before the first
partition, and an extlinux.conf on the FAT boot partition that U-Boot's standard (distro) boot
finds by itself: kernel, initrd, the profile's device tree, root by label and the console.

Debian builds no RK3588 U-Boot (u-boot-rockchip carries rk3328/rk3399 boards only: RK3588's
needs Rockchip's closed DDR-init blob), so the binary comes from the user: a
u-boot-rockchip.bin (idbloader with its RKNS header at 0, u-boot.itb, a FIT, at 0x7f8000),
written at sector 64 where the boot ROM looks; or none, for a board whose SPI flash already
holds U-Boot (and for QEMU, where U-Boot is the -bios).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from provision.errors import BadInput, ClawError
from provision.osimage import disk
from provision.profiles import DeviceProfile

FIRST_PARTITION_MB = 16  # Rockchip's layout: loader at 64, u-boot.itb at 16384, parts from 32768
OFFSET = 64 * disk.SECTOR  # where the RK35xx boot ROM reads the idbloader
ITB_OFFSET = (16384 - 64) * disk.SECTOR  # u-boot.itb inside u-boot-rockchip.bin (SPL_PAD_TO)
MAX_SIZE = FIRST_PARTITION_MB * disk.MIB - OFFSET
RKNS = b"RKNS"  # the RK35xx boot-ROM header (rk3568, rk3588)
FDT_MAGIC = b"\xd0\x0d\xfe\xed"
CONF = "extlinux/extlinux.conf"
KERNEL = "Image"  # uncompressed: booti takes it on every U-Boot, no kernel_comp_addr_r needed
HINT = ("pass --u-boot u-boot-rockchip.bin (the board's U-Boot: Radxa's, or mainline built "
        "with Rockchip's rkbin), or --u-boot none when the board boots U-Boot from its SPI "
        "flash")


@dataclass(frozen=True)
class Loader:
    """A U-Boot binary to write before the first partition."""

    data: bytes
    source: Path

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def read_loader(value: str | None, profile: DeviceProfile) -> Loader | None:
    """--u-boot FILE|none → the checked binary, or None (U-Boot lives elsewhere)."""
    if value is None:
        raise BadInput(f"profile {profile.name}: --u-boot is required: Debian builds no U-Boot "
                       f"for {profile.soc} (u-boot-rockchip ships rk3328/rk3399 boards only); "
                       f"{HINT}")
    if value == "none":
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise BadInput(f"--u-boot {value}: no such file ({HINT})")
    if not profile.soc.startswith("Rockchip RK35"):
        raise BadInput(f"--u-boot {value}: writing U-Boot is known for Rockchip RK35xx boards "
                       f"(sector 64), not {profile.soc}; use --u-boot none")
    data = path.read_bytes()
    if data[:4] != RKNS:
        raise BadInput(f"--u-boot {value}: no RKNS header at its start (found {data[:4]!r}; "
                       "expected u-boot-rockchip.bin for an RK35xx board)")
    if len(data) <= ITB_OFFSET or data[ITB_OFFSET:ITB_OFFSET + 4] != FDT_MAGIC:
        raise BadInput(f"--u-boot {value}: no u-boot.itb (FIT) at 0x{ITB_OFFSET:x} "
                       f"({len(data)} bytes; an idbloader.img alone? expected "
                       "u-boot-rockchip.bin, the idbloader and u-boot.itb in one file)")
    if len(data) > MAX_SIZE:
        raise BadInput(f"--u-boot {value}: {len(data)} bytes does not fit before the first "
                       f"partition (expected at most {MAX_SIZE} bytes)")
    return Loader(data, path)


def write_loader(image: Path, loader: Loader) -> None:
    """U-Boot's bytes at sector 64, between the GPT and the first partition."""
    with open(image, "r+b") as out:
        os.pwrite(out.fileno(), loader.data, OFFSET)


def extlinux_config(cmdline: str, dtb: str | None) -> str:
    """What U-Boot's pxe/extlinux parser reads; without `fdt` U-Boot hands over its own
    device tree (QEMU's, on the virt machine)."""
    lines = ["# claw os build: read by U-Boot's standard boot on the boot partition",
             "default claw", "prompt 0", "timeout 10", "", "label claw",
             "    menu label Debian (clawforge)", f"    linux /{KERNEL}",
             "    initrd /initrd.img"]
    if dtb:
        lines.append(f"    fdt /dtbs/{dtb}")
    lines.append(f"    append {cmdline}")
    return "\n".join(lines) + "\n"


def find_dtb(root: Path, kernel: Path, dtb: str) -> Path:
    """The profile's device tree from the installed kernel's package."""
    version = kernel.name.removeprefix("vmlinuz-")
    path = root / "usr/lib" / f"linux-image-{version}" / dtb
    if not path.is_file():
        raise ClawError(f"the kernel {version} has no device tree {dtb} (looked in "
                        f"/usr/lib/linux-image-{version}; the profile's os.kernel_suite may "
                        "need a newer kernel)")
    return path


def uncompressed_kernel(kernel: Path, work: Path) -> Path:
    """booti wants an uncompressed arm64 Image: Debian's vmlinuz is one (an EFI-stub Image);
    a gzipped kernel is unpacked first."""
    with open(kernel, "rb") as src:
        gzipped = src.read(2) == b"\x1f\x8b"
    if not gzipped:
        return kernel
    out = work / KERNEL
    with gzip.open(kernel, "rb") as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return out


def boot_files(root: Path, work: Path, profile: DeviceProfile, kernel: Path, initrd: Path,
               cmdline: str) -> dict[str, Path]:
    """Name on the FAT partition → source: the Image, initrd, device tree and extlinux.conf."""
    files = {KERNEL: uncompressed_kernel(kernel, work), "initrd.img": initrd}
    if profile.os.dtb:
        files[f"dtbs/{profile.os.dtb}"] = find_dtb(root, kernel, profile.os.dtb)
    conf = work / "extlinux.conf"
    conf.write_text(extlinux_config(cmdline, profile.os.dtb))
    files[CONF] = conf
    return files
