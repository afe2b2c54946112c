"""`claw os build`: a bootable disk image for a profile, from the cached provisioned root.

Everything happens in a work directory beside the output (same filesystem: the final step is
a rename); the output, its block map, its .sha256 and an optional .zst/.xz appear together or
not at all, and the work directory goes whatever happens.

Boot for `direct-kernel` profiles (qemu-virt): the FAT boot partition holds the kernel, the
initrd and cmdline.txt (root=PARTUUID=…), which the machine's loader (QEMU's -kernel/-initrd/
-append) boots; the same files are in the root's /boot for updates.

Boot for `uefi` profiles (generic-arm64): the same FAT partition is the ESP and also holds
EFI/BOOT/BOOTAA64.EFI (the removable-media path every UEFI firmware looks at, so no NVRAM
entry is needed) made by the root's own grub-mkimage, and EFI/BOOT/grub.cfg, which boots the
kernel and initrd beside it with the same command line.

Boot for `u-boot` profiles (rk3588): partitions from 16 MiB, the user's U-Boot at sector 64
(or none: U-Boot in the board's SPI flash), extlinux/extlinux.conf, the uncompressed Image,
the initrd and the profile's device tree on the FAT partition, root by label (uboot.py).

Boot for `rpi-firmware` profiles (rpi5): an MBR disk whose FAT partition 1 holds config.txt,
cmdline.txt (root=PARTUUID=…), the Image, the initrd and the device tree, read by the Pi 5's
EEPROM bootloader (rpi.py); the kernel is trixie-backports' 7.x (profiles/rpi5.yml).

Every image carries a kernel hook (boothook.py) that copies a newly installed kernel, its initrd
and device tree to the FAT partition under the same names.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.errors import BadInput, ClawError
from provision.osimage import boothook, disk, firstboot, rootfs, rpi, uboot
from provision.profiles import DeviceProfile, ProfileStore
from runtime import sizes

GIB = 1 << 30
SUPPORTED_BOOT = ("direct-kernel", "uefi", "u-boot", "rpi-firmware")
UEFI_FILES = ("EFI/BOOT/BOOTAA64.EFI", "EFI/BOOT/grub.cfg")
# Enough GRUB for a GPT disk, a FAT ESP and a gzip-compressed Debian kernel; nothing probed.
GRUB_MODULES = ["part_gpt", "part_msdos", "fat", "ext2", "normal", "configfile", "linux", "gzio",
                "echo", "search", "search_fs_uuid", "efi_gop"]
BOOT_FILES = ("vmlinuz", "initrd.img", "cmdline.txt")

Progress = Callable[[str], None]


@dataclass
class Steps:
    """Seconds per step, for the summary and the benchmark."""

    times: dict[str, float] = field(default_factory=dict)
    progress: Progress = print

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        self.progress(name)
        started = time.monotonic()
        try:
            return fn()
        finally:
            self.times[name] = round(time.monotonic() - started, 1)


def parse_size(value: str) -> int:
    """4G, 4GiB, 3500M, 4294967296 → bytes (runtime.sizes), rounded down to whole MiB."""
    size = sizes.parse_size(value)
    if size is None:
        raise BadInput(f"--size {value!r}: expected a size such as 4G, 3500M or 8GiB")
    size = size // disk.MIB * disk.MIB
    if not GIB <= size <= 1 << 40:
        raise BadInput(f"--size {value!r}: expected between 1G and 1T")
    return size


def check_output(output: Path) -> Path:
    output = output.expanduser()
    if not output.parent.resolve().is_dir():
        raise BadInput(f"-o {output}: the directory {output.parent} does not exist")
    if output.is_dir():
        raise BadInput(f"-o {output}: is a directory (expected the image file to write)")
    if output.suffix in (".zst", ".xz", ".gz", ".bmap"):
        raise BadInput(f"-o {output}: name the raw image (e.g. rpi5.img); --compress adds "
                       ".zst/.xz beside it")
    return output.parent.resolve() / output.name


def load_profile_any(name: str) -> DeviceProfile:
    """An arm64 profile, whatever its bootloader (customize keeps the image's own)."""
    profile = ProfileStore().get(name)
    if profile.arch != "arm64":
        raise BadInput(f"profile {name}: arch {profile.arch} (claw os makes arm64 images)")
    return profile


def load_profile(name: str) -> DeviceProfile:
    profile = load_profile_any(name)
    if profile.os.bootloader not in SUPPORTED_BOOT:
        raise BadInput(f"profile {name}: bootloader {profile.os.bootloader} is not supported "
                       f"by claw os build yet (supported: {', '.join(SUPPORTED_BOOT)}, e.g. "
                       "qemu-virt); `claw os customize` a vendor image for this board instead")
    return profile


def kernel_cmdline(profile: DeviceProfile, root_partuuid: str) -> str:
    """root by PARTUUID; by the profile's root_device (LABEL=claw-root) for U-Boot boards,
    whose extlinux.conf then holds nothing specific to one image."""
    root = (profile.os.root_device if profile.os.bootloader == "u-boot"
            else f"PARTUUID={root_partuuid}")
    return f"root={root} rw rootwait console={profile.os.console} net.ifnames=0"


def grub_config(cmdline: str) -> str:
    return ("# claw os build: the kernel and initrd on this ESP, root by PARTUUID\n"
            "set timeout=1\n"
            "menuentry 'Debian (clawforge)' {\n"
            f"  linux /vmlinuz {cmdline}\n"
            "  initrd /initrd.img\n"
            "}\n")


def uefi_boot_files(root: Path, work: Path, cmdline: str) -> dict[str, Path]:
    """BOOTAA64.EFI from the root's own GRUB (grub-efi-arm64-bin, run under qemu-user) with its
    prefix on the ESP it is loaded from, and the grub.cfg it reads there."""
    if not (root / "usr/lib/grub/arm64-efi").is_dir():
        raise ClawError("the root has no GRUB for arm64-efi (expected grub-efi-arm64-bin in "
                        "the profile's os.firmware_packages)")
    inside = "/tmp/claw-BOOTAA64.EFI"
    disk.run(["chroot", str(root), "grub-mkimage", "-O", "arm64-efi", "-o", inside,
              "-p", "/EFI/BOOT", *GRUB_MODULES], "grub-mkimage (arm64-efi)", timeout=600)
    efi, cfg = work / "BOOTAA64.EFI", work / "grub.cfg"
    os.replace(root / inside.lstrip("/"), efi)
    cfg.write_text(grub_config(cmdline))
    return dict(zip(UEFI_FILES, (efi, cfg), strict=True))


def write_fstab(root: Path, layout: disk.Layout) -> None:
    (root / "boot/firmware").mkdir(parents=True, exist_ok=True)
    (root / "etc/fstab").write_text(
        f"{firstboot.MARK}the partitions by their PARTUUID\n"
        f"PARTUUID={layout.root.uuid}\t/\text4\tdefaults,noatime\t0\t1\n"
        f"PARTUUID={layout.boot.uuid}\t/boot/firmware\tvfat\tdefaults,nofail,umask=0077\t0\t2\n")


def root_usage(root: Path) -> int:
    done = subprocess.run(["du", "-sxb", str(root)], capture_output=True, text=True)
    return int(done.stdout.split()[0]) if done.returncode == 0 else 0


def check_fits(root: Path, layout: disk.Layout, size_arg: str) -> None:
    need = root_usage(root) * 1.15 + 64 * disk.MIB  # ext4's own metadata and some room
    if need > layout.root.size:
        raise BadInput(f"--size {size_arg}: the root holds {root_usage(root) / GIB:.2f} GiB; "
                       f"expected --size {int(need + layout.root.start) // GIB + 1}G or more")


def kernel_files(root: Path) -> tuple[Path, Path]:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    initrds = sorted((root / "boot").glob("initrd.img-*"))
    if len(kernels) != 1 or len(initrds) != 1:
        raise ClawError(f"expected one kernel and one initrd in the root's /boot, found "
                        f"{[p.name for p in kernels + initrds] or 'none'}")
    return kernels[0], initrds[0]


def publish(produced: list[Path], output_dir: Path) -> list[Path]:
    """Move the finished files beside each other in one go (renames on one filesystem); a
    compressed copy left from an earlier build of the same name goes (it would not match)."""
    names = {path.name for path in produced}
    image = produced[-1].name
    for stale in (f"{image}.zst", f"{image}.xz"):
        if stale not in names:
            (output_dir / stale).unlink(missing_ok=True)
    final = []
    for path in produced:
        target = output_dir / path.name
        os.replace(path, target)
        final.append(target)
    return final


def finish_image(image: Path, compress: str | None, steps: Steps) -> list[Path]:
    """Block map (+ compressed copy) and IMAGE.sha256, all inside the work directory."""
    from provision.blockmap import map_image

    bmap, bmap_path, packed = steps.run(
        "block map, SHA-256" + (f" and .{compress}" if compress else ""),
        lambda: map_image(image, compress))
    sha = image.with_name(image.name + ".sha256")
    sha.write_text(f"{bmap.image_sha256}  {image.name}\n")
    return [p for p in dict.fromkeys([packed, bmap_path, sha, image])]


def build(profile_name: str, output: Path, *, size: str = "4G",
          settings: firstboot.Settings | None = None, host_vars: dict[str, Any] | None = None,
          compress: str | None = None, tags: list[str] | None = None,
          u_boot: str | None = None, progress: Progress = print,
          on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Build the image; returns what was written and how long each step took. `u_boot`:
    the board's U-Boot binary, or "none" (u-boot profiles only)."""
    settings = settings or firstboot.Settings()
    host_vars = host_vars or {}
    profile = load_profile(profile_name)
    size_bytes = parse_size(size)
    output = check_output(output)
    if compress not in (None, "zst", "xz"):
        raise BadInput(f"--compress {compress!r}: expected zst or xz")
    settings.console = settings.console or profile.os.console
    firstboot.check_settings(settings)
    if tags:
        from provision.provisioning import check_tags
        check_tags(tags)
        if settings.preload and "docker_engine" not in tags:
            raise BadInput("--preload-image needs Docker in the image: add docker_engine to "
                           "--tags")
    loader, first_mb = None, 1
    if profile.os.bootloader == "u-boot":
        loader, first_mb = uboot.read_loader(u_boot, profile), uboot.FIRST_PARTITION_MB
    elif u_boot is not None:
        raise BadInput(f"--u-boot: profile {profile.name} boots with "
                       f"{profile.os.bootloader}, not U-Boot")
    layout = (disk.plan_mbr(size_bytes, profile.os.boot_partition_mb)
              if profile.os.bootloader == "rpi-firmware"  # the Pi's firmware reads MBR only
              else disk.plan_gpt(size_bytes, profile.os.boot_partition_mb, first_mb))
    disk.check_tools()

    steps = Steps(progress=progress)
    started = time.monotonic()
    provisioned = steps.run("root filesystem (debootstrap + kernel + roles, cached by inputs)",
                            lambda: rootfs.provisioned_root(profile, host_vars, progress,
                                                            on_event, tags))
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.build-", dir=output.parent))
    removing = None
    try:
        root, image = work / "root", work / output.name
        steps.run("copying the provisioned root", lambda: rootfs.copy_tree(provisioned, root))
        check_fits(root, layout, size)

        def customise() -> None:
            firstboot.apply(root, settings, progress)
            write_fstab(root, layout)
            boothook.install(root, profile)
        steps.run("first-boot configuration", customise)
        kernel, initrd = kernel_files(root)
        cmdline = work / "cmdline.txt"
        cmdline.write_text(kernel_cmdline(profile, layout.root.uuid) + "\n")

        boot_files = {"vmlinuz": kernel, "initrd.img": initrd, "cmdline.txt": cmdline}
        if profile.os.bootloader == "uefi":
            boot_files |= steps.run("GRUB for UEFI (BOOTAA64.EFI, grub.cfg)",
                                    lambda: uefi_boot_files(root, work, cmdline.read_text()
                                                            .strip()))
        if profile.os.bootloader == "u-boot":
            boot_files = steps.run(
                "extlinux.conf, Image and device tree for U-Boot",
                lambda: uboot.boot_files(root, work, profile, kernel, initrd,
                                         cmdline.read_text().strip())) | {"cmdline.txt": cmdline}
        if profile.os.bootloader == "rpi-firmware":
            boot_files = steps.run(
                "config.txt, Image and device tree for the Pi firmware",
                lambda: rpi.boot_files(root, work, profile, kernel, initrd,
                                       cmdline.read_text().strip()))

        def partition() -> None:
            with open(image, "wb") as out:
                out.truncate(size_bytes)
            disk.write_partition_table(image, layout, legacy_boot=profile.os.bootloader
                                       == "u-boot")
            disk.make_fat(image, layout.boot, "CLAW-BOOT", boot_files)
        table = {"gpt": "GPT", "dos": "MBR"}[layout.label]
        steps.run(f"{table} and FAT boot partition ({profile.os.boot_partition_mb} MiB)",
                  partition)
        if loader is not None:
            steps.run(f"U-Boot at sector 64 ({len(loader.data)} bytes from {loader.source.name})",
                      lambda: uboot.write_loader(image, loader))
        steps.run(f"ext4 root filesystem ({layout.root.size // disk.MIB} MiB)",
                  lambda: disk.make_ext4(image, layout.root, root))
        removing = rootfs.start_removing(root)
        produced = finish_image(image, compress, steps)
        files = publish(produced, output.parent)
    finally:
        if removing is not None:
            steps.run("removing the work copy of the root", removing.wait)
        rootfs.remove_tree(work)
    boot = f"FAT partition 1: {', '.join(boot_files)}"
    if profile.os.bootloader == "u-boot":
        boot = (f"U-Boot at sector 64 from {loader.source} (sha256 {loader.sha256[:16]}…); "
                if loader else "U-Boot not written (--u-boot none: the board's own); ") + boot
    return {"image": str(output), "files": [str(f) for f in files], "profile": profile.name,
            "size": size_bytes, "root_partuuid": layout.root.uuid,
            "boot_partuuid": layout.boot.uuid, "cmdline": kernel_cmdline(profile, layout.root.uuid),
            "boot": boot, "steps": steps.times,
            "u_boot": ({"offset": uboot.OFFSET, "size": len(loader.data),
                        "sha256": loader.sha256} if loader else None),
            "seconds": round(time.monotonic() - started, 1)}


def extract_boot_files(image: Path, out_dir: Path) -> dict[str, Path]:
    """The kernel, initrd and command line from an image's FAT boot partition (to boot it
    with QEMU's -kernel/-initrd/-append)."""
    layout = disk.read_layout(image)
    out = {}
    for name in BOOT_FILES:
        dst = out_dir / name
        disk.run(["mcopy", "-o", "-i", f"{image}@@{layout.boot.start}", f"::/{name}", str(dst)],
                 f"mcopy {name} out of {image}")
        out[name] = dst
    return out

