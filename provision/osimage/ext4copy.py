"""An ext4 filesystem inside an image copied out to a directory as faithfully as mkfs.ext4 -d
can write it back: without mounting it. `debugfs rdump` copies the files, directories and
symlinks with owners and times, but keeps no extended attributes (security.capability: ping
without root), writes a hard-linked file once per name, skips device nodes, FIFOs and sockets,
and drops setuid/setgid bits. So the filesystem's tree is listed by inode (`ls -p <ino>`, one
debugfs per directory level), and what rdump missed is put back on the copy: modes, hard links
(os.link), special files (os.mknod), extended attributes (`ea_get`, os.setxattr). Every query
is batched into one debugfs process (`-f`): a vendor root has ~50-100k files.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from provision.errors import ClawError
from provision.osimage import disk

ROOT_INODE = 2
DEVICE_NUMBER = re.compile(r"Device major/minor number: (\d+):(\d+)")
XATTR_NAME = re.compile(r"^  (\S+) \((\d+)\) = ")
SPECIAL = {stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK}
SKIPPED_XATTRS = {"system.data"}  # ext4's inline data, not an attribute


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the filesystem's root, "" for the root itself
    ino: int
    mode: int
    uid: int
    gid: int


@dataclass
class Fidelity:
    """What the copy put back beyond rdump, for the build record."""
    files: int = 0
    modes: int = 0
    hard_links: int = 0
    special_files: int = 0
    xattrs: int = 0
    seconds: float = 0.0  # the listing and the fixes after rdump


def batch(source: str, commands: list[str], what: str) -> dict[str, list[str]]:
    """`commands` run by one debugfs; each command's output lines, by command."""
    if not commands:
        return {}
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs") as script:
        script.write("".join(f"{c}\n" for c in commands))
        script.flush()
        out = disk.run(["debugfs", "-f", script.name, source], what)
    replies: dict[str, list[str]] = {}
    current: list[str] = []
    for line in out.splitlines():
        if line.startswith("debugfs: "):
            current = replies.setdefault(line.removeprefix("debugfs: "), [])
        else:
            current.append(line)
    return replies


def listing(source: str) -> list[Entry]:
    """Every name in the filesystem, the root's entry first, parents before children."""
    entries = [Entry("", ROOT_INODE, stat.S_IFDIR | 0o755, 0, 0)]
    level = {ROOT_INODE: ""}
    while level:
        replies = batch(source, [f"ls -p <{ino}>" for ino in level], "debugfs ls")
        below: dict[int, str] = {}
        for ino, parent in level.items():
            for line in replies.get(f"ls -p <{ino}>", []):
                fields = line.split("/")  # /ino/mode/uid/gid/name/size/: names hold no "/"
                if len(fields) != 8 or fields[5] in (".", ".."):
                    if ino == ROOT_INODE and len(fields) == 8 and fields[5] == ".":
                        entries[0] = Entry("", ROOT_INODE, int(fields[2], 8), int(fields[3]),
                                           int(fields[4]))
                    continue
                entry = Entry(f"{parent}/{fields[5]}".lstrip("/"), int(fields[1]),
                              int(fields[2], 8), int(fields[3]), int(fields[4]))
                if entry.ino == 0:
                    continue
                entries.append(entry)
                if stat.S_ISDIR(entry.mode):
                    below[entry.ino] = entry.path
        level = below
    return entries


def device_numbers(source: str, inodes: list[int]) -> dict[int, int]:
    replies = batch(source, [f"stat <{ino}>" for ino in inodes], "debugfs stat")
    found = {}
    for ino in inodes:
        for line in replies.get(f"stat <{ino}>", []):
            if match := DEVICE_NUMBER.search(line):
                found[ino] = os.makedev(int(match[1]), int(match[2]))
    return found


def xattrs(source: str, inodes: list[int], scratch: Path) -> dict[int, dict[str, bytes]]:
    """The extended attributes of `inodes`: names from `ea_list`, then each value written raw
    to a scratch file by `ea_get -f` (ea_list prints values escaped or as hex)."""
    replies = batch(source, [f"ea_list <{ino}>" for ino in inodes], "debugfs ea_list")
    wanted = [(ino, match[1]) for ino in inodes for line in replies.get(f"ea_list <{ino}>", [])
              if (match := XATTR_NAME.match(line)) and match[1] not in SKIPPED_XATTRS]
    batch(source, [f'ea_get -f "{scratch}/{k}" <{ino}> {name}'
                   for k, (ino, name) in enumerate(wanted)], "debugfs ea_get")
    found: dict[int, dict[str, bytes]] = defaultdict(dict)
    for k, (ino, name) in enumerate(wanted):
        value = scratch / str(k)
        if not value.is_file():
            raise ClawError(f"debugfs ea_get did not read {name} of inode {ino}")
        found[ino][name] = value.read_bytes()
    return found


def copy_out(image: Path, part: disk.Partition, root: Path) -> Fidelity:
    """The ext4 tree at `part` into the new directory `root`, with owners, full modes, hard
    links, device nodes, FIFOs, sockets and extended attributes."""
    source = disk.at(image, part)
    root.mkdir()
    disk.run(["debugfs", "-R", f'rdump / "{root}"', source], "debugfs rdump")  # spaces
    started = time.monotonic()
    entries = listing(source)
    done = Fidelity(files=len(entries))
    numbers = device_numbers(source, sorted({e.ino for e in entries
                                             if stat.S_ISCHR(e.mode) or stat.S_ISBLK(e.mode)}))
    first: dict[int, Path] = {}
    for entry in entries:
        path = root / entry.path
        if entry.ino in first and not stat.S_ISDIR(entry.mode):
            if os.path.lexists(path):
                os.unlink(path)
            os.link(first[entry.ino], path, follow_symlinks=False)
            done.hard_links += 1
            continue
        first[entry.ino] = path
        if stat.S_IFMT(entry.mode) in SPECIAL:
            if os.path.lexists(path):
                os.unlink(path)
            os.mknod(path, entry.mode, numbers.get(entry.ino, 0))
            os.lchown(path, entry.uid, entry.gid)
            done.special_files += 1
        if stat.S_ISLNK(entry.mode) or not os.path.lexists(path):
            continue
        if stat.S_IMODE(os.lstat(path).st_mode) != stat.S_IMODE(entry.mode):
            os.chmod(path, stat.S_IMODE(entry.mode))
            done.modes += 1
    with tempfile.TemporaryDirectory(prefix="claw-xattrs-") as scratch:
        found = xattrs(source, list(first), Path(scratch))
    for ino, attributes in found.items():
        for name, value in attributes.items():
            try:
                os.setxattr(first[ino], name, value, follow_symlinks=False)
            except OSError as exc:
                raise ClawError(f"cannot keep the extended attribute {name} of "
                                f"/{first[ino].relative_to(root)} in {root.parent} ({exc}): "
                                "write -o to a filesystem that keeps them (ext4, xfs)") from None
            done.xattrs += 1
    done.seconds = round(time.monotonic() - started, 2)
    return done
