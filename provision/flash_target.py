"""Is this target safe to overwrite? The refusals of `claw flash`, decided before any write.

Overwriting the wrong disk is the one mistake a flasher must never make, so a block device is
refused when it (or a partition on it) is mounted, used as swap, held by device-mapper/RAID
(sysfs holders), or holds `/`; a regular file is only written with --target-file.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from provision.errors import BadInput

SYS_BLOCK = Path("/sys/class/block")


@dataclass(frozen=True)
class Target:
    path: Path
    is_block: bool
    size: int | None  # None: a file, it grows to the image's size


def _sysfs(rdev: int) -> Path | None:
    link = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")
    return link.resolve() if link.exists() else None


def _family(node: Path) -> list[Path]:
    """A whole disk and its partitions (a partition alone stands for itself)."""
    if (node / "partition").exists():
        return [node]
    return [node] + [p for p in node.iterdir() if (p / "partition").exists()]


def _devnum(node: Path) -> str:
    return (node / "dev").read_text().strip()


def _mounts() -> list[tuple[str, str, str]]:
    """(major:minor, mount point, source) of every mount this process can see."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        out.append((fields[2], fields[4].replace("\\040", " "), tail[1] if len(tail) > 1 else ""))
    return out


def _root_nodes() -> set[str]:
    """major:minor of the device holding `/` and of its whole disk."""
    nums = {num for num, point, _ in _mounts() if point == "/"}
    for _num, point, source in _mounts():
        if point == "/" and source.startswith("/dev/") and os.path.exists(source):
            nums.add(f"{os.major(os.stat(source).st_rdev)}:{os.minor(os.stat(source).st_rdev)}")
    disks = set()
    for num in nums:
        node = Path(f"/sys/dev/block/{num}")
        if node.exists():
            node = node.resolve()
            disks.add(_devnum(node.parent if (node / "partition").exists() else node))
    return nums | disks


def check_block_device(path: Path, st: os.stat_result) -> Target:
    node = _sysfs(st.st_rdev)
    if node is None:
        raise BadInput(f"{path}: block device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)} "
                       "not found in /sys (cannot check that it is unused)")
    members = _family(node)
    parent = node.parent if (node / "partition").exists() else node
    roots = _root_nodes()
    if {_devnum(m) for m in members} & roots or _devnum(parent) in roots:
        raise BadInput(f"{path}: holds / (the running system); refusing to overwrite it")
    nums = {_devnum(m): m.name for m in members}
    for num, point, source in _mounts():
        if num in nums or source in {f"/dev/{m.name}" for m in members}:
            name = nums.get(num) or source.removeprefix("/dev/")
            raise BadInput(f"{path}: /dev/{name} is mounted at {point}; unmount it first")
    swaps = Path("/proc/swaps").read_text().splitlines()[1:]
    for line in swaps:
        if line.split()[0] in {f"/dev/{m.name}" for m in members}:
            raise BadInput(f"{path}: {line.split()[0]} is in use as swap; swapoff it first")
    for m in members:
        holders = sorted(h.name for h in (m / "holders").iterdir()) if (m / "holders").exists() \
            else []
        if holders:
            raise BadInput(f"{path}: /dev/{m.name} is held by {', '.join(holders)} "
                           "(device-mapper, LVM or RAID); release it first")
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    return Target(path, True, size)


def check_target(target: Path, target_file: bool, image: Path) -> Target:
    """The target as it may be written, or BadInput with the reason (nothing written)."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        if target_file:
            if not target.parent.is_dir():
                raise BadInput(f"{target}: its directory does not exist") from None
            return Target(target, False, None)
        raise BadInput(f"{target}: no such device (to write a new file, add --target-file)") \
            from None
    except OSError as exc:
        raise BadInput(f"{target}: cannot inspect the target ({exc.strerror})") from None
    if image.exists() and os.path.samefile(target, image):
        raise BadInput(f"{target}: is the image itself")
    if stat.S_ISBLK(st.st_mode):
        if target_file:
            raise BadInput(f"{target}: is a block device, not a file (drop --target-file)")
        return check_block_device(target, st)
    if not target_file:
        raise BadInput(f"{target}: not a block device (to write to a regular file, add "
                       "--target-file)")
    if not stat.S_ISREG(st.st_mode):
        raise BadInput(f"{target}: not a regular file")
    return Target(target, False, None)
