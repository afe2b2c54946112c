"""Disk images without loop devices or mounts: sfdisk writes the partition table into the
file, mkfs.vfat/mkfs.ext4 write their filesystems at the partitions' offsets (mkfs.ext4 -d fills
the root from a directory), mtools copies files into the FAT, debugfs reads an ext4 partition
in place (`IMAGE?offset=N`). Nothing is left behind on failure but the file itself.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from provision.errors import BadInput, ClawError

MIB = 1 << 20
SECTOR = 512
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_ARM64_TYPE = "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"  # discoverable partitions: root, arm64
LINUX_TYPES = {ROOT_ARM64_TYPE, "0FC63DAF-8483-4772-8E79-3D69D8477DE4", "83"}
FAT_TYPES = {ESP_TYPE, "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7", "c", "b", "e", "ef"}
TOOLS = {"sfdisk": "fdisk", "mkfs.vfat": "dosfstools", "mcopy": "mtools",
         "mkfs.ext4": "e2fsprogs", "debugfs": "e2fsprogs", "e2fsck": "e2fsprogs"}


@dataclass(frozen=True)
class Partition:
    number: int
    start: int  # bytes
    size: int   # bytes
    type: str
    uuid: str   # PARTUUID (GPT) or DISKID-NN (MBR)

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class Layout:
    label: str  # gpt or dos
    size: int
    boot: Partition
    root: Partition


def check_tools(*names: str) -> None:
    for name in names or tuple(TOOLS):
        if shutil.which(name) is None:
            raise ClawError(f"{name} is not installed (apt-get install {TOOLS[name]}; "
                            "see `claw doctor`)")


def run(argv: list[str], what: str, input: str | None = None, timeout: float = 1800) -> str:
    try:
        done = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ClawError(f"{what} did not finish in {timeout:.0f} s") from None
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise ClawError(f"{what} failed (exit {done.returncode}): {tail}")
    return done.stdout


def plan_gpt(size: int, boot_mb: int, first_mb: int = 1) -> Layout:
    """A 1 MiB-aligned FAT boot/ESP partition at `first_mb` MiB (16 leaves room for a
    Rockchip U-Boot before it), then the root to 1 MiB before the end (the backup GPT lives
    there)."""
    boot = Partition(1, first_mb * MIB, boot_mb * MIB, ESP_TYPE, str(uuid.uuid4()))
    root_start = boot.end
    root = Partition(2, root_start, size - MIB - root_start, ROOT_ARM64_TYPE, str(uuid.uuid4()))
    if root.size < 256 * MIB:
        raise BadInput(f"--size {size // MIB} MiB leaves {root.size // MIB} MiB for the root "
                       f"(expected at least 256 MiB after the {boot_mb} MiB boot partition)")
    return Layout("gpt", size, boot, root)


def plan_mbr(size: int, boot_mb: int) -> Layout:
    """An MBR disk for firmware that reads only MBR (the Raspberry Pi's): FAT32-LBA (0x0c)
    partition 1 at 1 MiB, the Linux root after it to the disk's end. PARTUUIDs are the disk
    identifier and the partition number (e.g. 1a2b3c4d-02), as the kernel names them."""
    disk_id = f"{uuid.uuid4().int & 0xFFFFFFFF or 1:08x}"
    boot = Partition(1, MIB, boot_mb * MIB, "c", f"{disk_id}-01")
    root = Partition(2, boot.end, size - boot.end, "83", f"{disk_id}-02")
    if root.size < 256 * MIB:
        raise BadInput(f"--size {size // MIB} MiB leaves {root.size // MIB} MiB for the root "
                       f"(expected at least 256 MiB after the {boot_mb} MiB boot partition)")
    return Layout("dos", size, boot, root)


def write_partition_table(image: Path, layout: Layout, legacy_boot: bool = False) -> None:
    """`legacy_boot` marks the boot partition LegacyBIOSBootable: the flag U-Boot's distro
    boot looks for first when it scans a disk for extlinux.conf. An MBR layout marks its boot
    partition active (bootable) and carries the disk identifier of its PARTUUIDs."""
    if layout.label == "dos":
        lines = ["label: dos", "unit: sectors", f"label-id: 0x{layout.boot.uuid[:8]}"]
        lines += [f"start={part.start // SECTOR}, size={part.size // SECTOR}, type={part.type}"
                  + (", bootable" if part is layout.boot else "")
                  for part in (layout.boot, layout.root)]
        run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(image)], "sfdisk",
            input="\n".join(lines) + "\n")
        return
    lines = ["label: gpt", "unit: sectors", "first-lba: 2048"]
    for part, name in ((layout.boot, "boot"), (layout.root, "root")):
        attrs = ', attrs="LegacyBIOSBootable"' if legacy_boot and part is layout.boot else ""
        lines.append(f"start={part.start // SECTOR}, size={part.size // SECTOR}, "
                     f"type={part.type}, uuid={part.uuid}, name=\"{name}\"{attrs}")
    run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(image)], "sfdisk",
        input="\n".join(lines) + "\n")


def make_fat(image: Path, part: Partition, label: str, files: dict[str, Path]) -> None:
    """mkfs.vfat at the partition's offset, then `files` (name in the FAT → source) copied in."""
    run(["mkfs.vfat", "-F", "32", "-s", "1", "-n", label, f"--offset={part.start // SECTOR}",
         str(image), str(part.size // 1024)], "mkfs.vfat")
    fill_fat(image, part, files)


def fill_fat(image: Path, part: Partition, files: dict[str, Path]) -> None:
    """`files` into the FAT; the folders their names need (EFI/BOOT/…) are made first."""
    target = f"{image}@@{part.start}"
    folders = sorted({"/".join(name.split("/")[:i]) for name in files
                      for i in range(1, name.count("/") + 1)})
    for folder in folders:
        if subprocess.run(["mdir", "-b", "-i", target, f"::/{folder}"],
                          capture_output=True).returncode != 0:
            run(["mmd", "-i", target, f"::/{folder}"], f"mmd {folder}")
    for name, src in files.items():
        run(["mcopy", "-o", "-i", target, str(src), f"::/{name}"], f"mcopy {name}")


def make_ext4(image: Path, part: Partition, root: Path, label: str = "claw-root",
              fs_uuid: str | None = None) -> None:
    """The root filesystem, filled from `root`, written at the partition's offset."""
    argv = ["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", label, "-d", str(root),
            "-E", f"offset={part.start}"]
    if fs_uuid:
        argv += ["-U", fs_uuid]
    run([*argv, str(image), f"{part.size // 1024}k"], "mkfs.ext4 -d", timeout=1800)


def at(image: Path, part: Partition) -> str:
    """The name e2fsprogs opens a partition inside an image file by."""
    return f"{image}?offset={part.start}"


def read_layout(image: Path) -> Layout:
    """The boot and root partitions of an image made elsewhere; bad input when there is no
    partition table, no FAT boot partition or no ext4 root."""
    done = subprocess.run(["sfdisk", "--json", str(image)], capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.strip():
        raise BadInput(f"{image}: no partition table found (expected a GPT or MBR disk image)")
    table = json.loads(done.stdout)["partitiontable"]
    sector = int(table.get("sectorsize", SECTOR))
    parts = [Partition(i + 1, int(p["start"]) * sector, int(p["size"]) * sector,
                       str(p["type"]).upper().removeprefix("0X").lower()
                       if table["label"] == "dos" else str(p["type"]).upper(),
                       str(p.get("uuid", "")))
             for i, p in enumerate(table.get("partitions", []))]
    size = image.stat().st_size
    for part in parts:
        if part.end > size:
            raise BadInput(f"{image}: partition {part.number} ends past the image's end "
                           "(a truncated image?)")
    roots = [p for p in parts if p.type in LINUX_TYPES and fs_type(image, p) == "ext4"]
    if not roots:
        found = ", ".join(f"{p.number}: {fs_type(image, p) or 'unknown'}" for p in parts)
        raise BadInput(f"{image}: no ext4 root partition (partitions: {found or 'none'}; "
                       "expected a Linux partition holding ext4)")
    boots = [p for p in parts if p.type in FAT_TYPES and fs_type(image, p) == "vfat"]
    if not boots:
        raise BadInput(f"{image}: no FAT boot partition (expected an ESP or a FAT partition "
                       "before the root)")
    return Layout(table["label"], size, boots[0], roots[-1])


def fs_type(image: Path, part: Partition) -> str:
    done = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", "-O", str(part.start),
                           "-S", str(part.size), str(image)], capture_output=True, text=True)
    return done.stdout.strip()


def grow_root(image: Path, layout: Layout) -> Layout:
    """The root partition extended to the disk's end (1 MiB-aligned, GPT's backup table kept
    room for), when it is the last partition. The table is rewritten from sfdisk's own dump,
    so the disk identifier, partition UUIDs, names, types and flags stay; GPT's backup header
    moves to the (grown) file's end. The filesystem is not touched: mkfs.ext4 -d follows."""
    size = image.stat().st_size
    end = max(layout.root.end, (size - (MIB if layout.label == "gpt" else 0)) // MIB * MIB)
    if end == layout.root.end:
        return layout
    dump = run(["sfdisk", "--dump", str(image)], "sfdisk --dump")
    lines, parts = [], 0
    for line in dump.splitlines():
        if line.startswith("last-lba:"):
            continue  # the old disk's end: sfdisk puts the new one
        fields = dict(f.strip().split("=", 1) for f in line.split(":", 1)[-1].split(",")
                      if "=" in f) if " : start=" in line else {}
        if fields:
            parts += 1
            start = int(fields["start"]) * SECTOR
            if start > layout.root.start:
                raise ClawError(f"{image}: partition {parts} lies after the root partition; "
                                "the root cannot grow")
            if start == layout.root.start:
                line = line.replace(f"size={fields['size']}",
                                    f"size={(end - layout.root.start) // SECTOR}", 1)
        lines.append(line)
    run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(image)], "sfdisk (grow root)",
        input="\n".join(lines) + "\n")
    grown = read_layout(image)
    if grown.root.start != layout.root.start or grown.root.end != end:
        raise ClawError(f"{image}: sfdisk did not grow the root partition as asked")
    return grown
