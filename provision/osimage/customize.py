"""`claw os customize`: the same provisioning and first-boot settings applied to an image made
elsewhere (a vendor's Raspberry Pi OS or Armbian image, or any GPT/MBR arm64 image with a FAT
boot partition and an ext4 root).

The image is read, never mounted: sfdisk --json and blkid find the partitions, debugfs copies
the root filesystem out (ext4copy: `rdump`, then what rdump drops put back from debugfs' own
listing: setuid bits, hard links, device nodes, FIFOs, sockets, extended attributes such as
file capabilities and ACLs), the roles run on that tree through the chroot connection, and
mkfs.ext4 -d writes it back (xattrs, hard links and special files included) in the same place
with the same label and UUID, so the vendor's boot configuration (root=PARTUUID/UUID/LABEL)
still finds it. The boot partition is kept as it is.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from provision.errors import BadInput, ClawError
from provision.osimage import build, disk, ext4copy, firstboot, rootfs
from provision.osimage.build import Steps, check_output, finish_image, publish, root_usage

EM_AARCH64 = 183
CHUNK = 8 << 20
ZERO = bytes(CHUNK)

Progress = Callable[[str], None]


def unpack(base: Path, image: Path) -> None:
    """BASE (raw, .zst, .xz, .gz) to a sparse raw file: zero chunks become holes."""
    from provision.flash import compression_of, open_stream

    with open_stream(base, compression_of(base)) as src, open(image, "wb") as out:
        while True:
            try:
                buf = src.read(CHUNK)
            except (OSError, EOFError, ValueError) as exc:
                raise BadInput(f"{base}: cannot decompress it ({exc})") from None
            if not buf:
                break
            if buf == ZERO[:len(buf)]:
                out.seek(len(buf), os.SEEK_CUR)
            else:
                out.write(buf)
        out.truncate()


def fs_field(image: Path, part: disk.Partition, name: str) -> str:
    done = subprocess.run(["blkid", "-p", "-o", "value", "-s", name, "-O", str(part.start),
                           "-S", str(part.size), str(image)], capture_output=True, text=True)
    return done.stdout.strip()


def grow_file(image: Path, new_size: int, size_arg: str) -> None:
    """The unpacked image made `new_size` long (sparse): room the root partition grows into."""
    current = image.stat().st_size
    if new_size < current:
        raise BadInput(f"--size {size_arg}: smaller than the base image's "
                       f"{current / 2**30:.2f} GiB (expected at least {-(-current // 2**20)}M)")
    with open(image, "r+b") as out:
        out.truncate(new_size)


def check_arch(root: Path, base: Path) -> None:
    shell = root / "bin/sh"
    target = Path(os.readlink(shell)) if shell.is_symlink() else Path("sh")
    candidates = [root / "bin" / target, root / "usr/bin" / target.name, root / "usr/bin/dash",
                  root / "bin/dash"]
    elf = next((c for c in candidates if c.is_file() and not c.is_symlink()), None)
    if elf is None:
        raise BadInput(f"{base}: the root partition has no /bin/sh (not a Linux root)")
    head = elf.read_bytes()[:20]
    machine = int.from_bytes(head[18:20], "little") if head[:4] == b"\x7fELF" else -1
    if machine != EM_AARCH64:
        raise BadInput(f"{base}: the root is not arm64 (ELF machine {machine} in {elf.name}; "
                       "expected aarch64)")


def customize(base: Path, output: Path, *, profile_name: str = "generic-arm64",
              settings: firstboot.Settings | None = None,
              host_vars: dict[str, Any] | None = None, tags: list[str] | None = None,
              compress: str | None = None, size: str | None = None,
              progress: Progress = print,
              on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    from provision.flash import compression_of
    from provision.osimage.build import load_profile_any

    settings = settings or firstboot.Settings()
    profile = load_profile_any(profile_name)
    output = check_output(output)
    if compress not in (None, "zst", "xz"):
        raise BadInput(f"--compress {compress!r}: expected zst or xz")
    compression_of(base)  # bad input: missing, a directory, a block map
    if base.resolve() == output.resolve():
        raise BadInput(f"-o {output}: is the base image (write the result elsewhere)")
    firstboot.check_settings(settings)
    new_size = build.parse_size(size) if size else None
    disk.check_tools()
    extra = ["fdisk", *(["wpasupplicant"] if settings.wifi else [])]
    host_vars = {**(host_vars or {})}
    host_vars["base_extra_packages"] = [*host_vars.get("base_extra_packages", []), *extra]

    steps = Steps(progress=progress)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.build-", dir=output.parent))
    try:
        image, root = work / output.name, work / "root"
        steps.run(f"reading {base.name}", lambda: unpack(base, image))
        if new_size is not None:
            grow_file(image, new_size, size or "")
        layout = disk.read_layout(image)
        label, fs_uuid = fs_field(image, layout.root, "LABEL"), fs_field(image, layout.root,
                                                                         "UUID")
        copied = steps.run(f"copying out the root filesystem (partition {layout.root.number})",
                           lambda: ext4copy.copy_out(image, layout.root, root))
        check_arch(root, base)
        steps.run("applying the provisioning roles offline (chroot connection)",
                  lambda: rootfs.apply_roles(root, profile.name, host_vars, work / "build.log",
                                             on_event, tags=tags))
        steps.run("first-boot configuration", lambda: firstboot.apply(root, settings, progress))
        need = root_usage(root) * 1.15 + 64 * disk.MIB
        if need > layout.root.size or new_size is not None:
            layout = steps.run("growing the root partition to the disk's end",
                               lambda: disk.grow_root(image, layout))
        if need > layout.root.size:
            raise ClawError(f"the customised root needs {need / 2**30:.2f} GiB, more than its "
                            f"partition's {layout.root.size / 2**30:.2f} GiB (a bigger --size, "
                            "fewer roles with --tags, or a base image with a bigger root "
                            "partition)")
        steps.run("writing the root filesystem back",
                  lambda: disk.make_ext4(image, layout.root, root, label=label or "rootfs",
                                         fs_uuid=fs_uuid or None))
        rootfs.remove_tree(root)
        files = publish(finish_image(image, compress, steps), output.parent)
    finally:
        rootfs.remove_tree(work)
    return {"image": str(output), "files": [str(f) for f in files], "base": str(base),
            "profile": profile.name, "size": layout.size, "table": layout.label,
            "boot_partition": layout.boot.number, "root_partition": layout.root.number,
            "root_label": label, "root_uuid": fs_uuid,
            "root_copy": dataclasses.asdict(copied), "steps": steps.times,
            "seconds": round(time.monotonic() - started, 1)}
