"""What the `claw os` e2e tests share: a login key, `claw os` run as a user runs it (a process,
`--json`), user profiles in a private config dir, an image booted under TCG with a shell on
it, and reads of a built image's FAT and ext4 partitions without mounting them."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from provision import vm as vms
from provision.osimage import disk

CLAW = Path(sys.executable).parent / "claw"
# the bootloader is what most builds check: the roles' effects are test_os_build's (all of
# them cost minutes more of a cold root under qemu-user)
BASE_ROLE_ONLY = ("--tags", "base")


def login_key(folder: Path) -> Path:
    """A fresh ed25519 key pair (no passphrase): the image's user logs in with it."""
    key = folder / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def user_profiles(folder: Path, profiles: dict[str, str]) -> dict[str, str]:
    """Profiles (name: YAML text) in a config dir of their own; the env that makes claw see it."""
    where = folder / "config" / "clawforge" / "profiles"
    where.mkdir(parents=True, exist_ok=True)
    for name, text in profiles.items():
        (where / f"{name}.yml").write_text(text)
    return {"XDG_CONFIG_HOME": str(folder / "config")}


def claw_os(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`claw os ARGS --json` as a process; its record, with `wall_s` added."""
    started = time.monotonic()
    done = subprocess.run([str(CLAW), "os", *args, "--json"], capture_output=True, text=True,
                          timeout=3600, env={**os.environ, "COLUMNS": "200", **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout)
    record["wall_s"] = round(time.monotonic() - started, 1)
    print(f"claw os {args[0]} {args[1]}: {record['wall_s']} s, steps {record.get('steps')}")
    return record


@contextmanager
def booted(image: vms.VmImage, name: str, **start: Any) -> Iterator[vms.Vm]:
    """The image booted under TCG until SSH answers (start_vm's options), stopped after."""
    started = time.monotonic()
    machine = vms.start_vm(image, name=name, progress=lambda _: None, **start)
    print(f"{name}: boot to SSH {time.monotonic() - started:.0f} s")
    try:
        yield machine
    finally:
        machine.stop()


def sh(machine: vms.Vm, command: str) -> str:
    return machine.ssh(command, check=True).stdout.strip()


def fat_read(image: Path, layout: disk.Layout, name: str) -> bytes:
    """A file of the image's FAT boot partition (mtools, no mount)."""
    return subprocess.run(["mtype", "-i", f"{image}@@{layout.boot.start}", f"::/{name}"],
                          capture_output=True, check=True).stdout


def debugfs(image: Path, layout: disk.Layout, command: str) -> bytes:
    """A debugfs command's output on the image's ext4 root (`cat PATH`, `ls DIR`; no mount)."""
    return subprocess.run(["debugfs", "-R", command, disk.at(image, layout.root)],
                          capture_output=True, check=True).stdout


def unpacked(initrd: bytes) -> bytes:
    """An initramfs's cpio bytes, whether stored plain, gzip or zstd."""
    if initrd[:2] == b"\x1f\x8b":
        return gzip.decompress(initrd)
    if initrd[:4] == b"\x28\xb5\x2f\xfd":
        return subprocess.run(["zstd", "-dc"], input=initrd, capture_output=True,
                              check=True).stdout
    return initrd
