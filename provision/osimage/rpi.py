"""Boot for `rpi-firmware` profiles (rpi5): the Pi 5's EEPROM bootloader reads the first FAT
partition of an MBR disk by itself (no start*.elf on a Pi 5), then config.txt, which names the
kernel, the initramfs and the device tree beside it, and cmdline.txt, the kernel's command line.

The kernel is Debian's (trixie-backports' 7.x, whose bcm2712-rpi-5-b.dtb has PCIe and RP1: see
profiles/rpi5.yml), an uncompressed arm64 Image the firmware loads as it loads its own
kernel_2712.img; its device tree goes to the FAT's root, where the firmware looks.
"""

from __future__ import annotations

from pathlib import Path

from provision.osimage import uboot
from provision.profiles import DeviceProfile

KERNEL = "Image"
INITRD = "initrd.img"
CONFIG = "config.txt"
CMDLINE = "cmdline.txt"


def dtb_name(profile: DeviceProfile) -> str:
    """broadcom/bcm2712-rpi-5-b.dtb → bcm2712-rpi-5-b.dtb, its name in the FAT's root."""
    return Path(profile.os.dtb or "").name


def config_txt(profile: DeviceProfile) -> str:
    """What the firmware reads: a 64-bit kernel, the initramfs loaded right after it, the
    profile's device tree, the debug UART on when the console is a serial port."""
    lines = ["# claw os build: read by the Raspberry Pi 5's EEPROM bootloader from this FAT",
             "# partition (the kernel's boot hook, /etc/kernel/postinst.d/zz-claw-boot, "
             "refreshes the files it names)",
             "arm_64bit=1", f"kernel={KERNEL}", f"initramfs {INITRD} followkernel"]
    if profile.os.dtb:
        lines.append(f"device_tree={dtb_name(profile)}")
    if profile.os.console.startswith("ttyAMA"):
        lines.append("enable_uart=1")
    return "\n".join(lines) + "\n"


def boot_files(root: Path, work: Path, profile: DeviceProfile, kernel: Path, initrd: Path,
               cmdline: str) -> dict[str, Path]:
    """Name on the FAT partition → source: Image, initrd, device tree, config.txt and
    cmdline.txt (one line: the firmware passes it as the kernel's command line)."""
    files = {KERNEL: uboot.uncompressed_kernel(kernel, work), INITRD: initrd}
    if profile.os.dtb:
        files[dtb_name(profile)] = uboot.find_dtb(root, kernel, profile.os.dtb)
    config, line = work / CONFIG, work / CMDLINE
    config.write_text(config_txt(profile))
    line.write_text(cmdline + "\n")
    return files | {CONFIG: config, CMDLINE: line}
