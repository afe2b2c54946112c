"""Root trees for OS images, each cached by a hash of its inputs under the state directory:

- the *base* root: debootstrap + the profile's kernel (vm.bootstrap_root, the same recipe as
  the QEMU VM's) + what first boot needs (sfdisk to grow the root, wpa_supplicant, resolved);
- the *provisioned* root: the base root with playbooks/site.yml applied offline through the
  chroot connection (playbooks/connection_plugins/chroot.py), so the roles write only the
  persistent part of their settings. Its key adds the profile, the host variables and the
  playbooks' own files, so a change to any role makes a new one.

Per-device settings (firstboot.py) are applied to a copy, so both caches stay generic.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from images.base import MIRROR, SUITE
from provision import vm
from provision.ansible import playbooks_dir
from provision.errors import ClawError
from provision.osimage import boothook
from provision.paths import state_dir
from provision.profiles import DeviceProfile

RECIPE = 1  # bump when the way a root is made changes
KEEP = 3  # cached roots kept per kind (base, provisioned per profile), most recently used first
FIRST_BOOT_PACKAGES = ["fdisk", "wpasupplicant", "systemd-resolved"]
HOST = "os-image"

Progress = Callable[[str], None]


def roots_dir() -> Path:
    return state_dir() / "os" / "roots"


def last_log() -> Path:
    return state_dir() / "os" / "last-build.log"


def _digest(inputs: Any) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def base_key(profile: DeviceProfile) -> str:
    """The base holds the kernel, not the board's firmware/bootloader packages (those go over a
    copy in provisioned_root), so every profile with the same kernel shares one debootstrap.
    The empty slot is where firmware once was: the keys of roots already cached stay valid."""
    if profile.os.kernel_suite:  # the release's base with the kernel replaced: see base_root
        inputs = [base_key(release_kernel(profile)), profile.os.kernel_packages,
                  profile.os.kernel_suite, RECIPE]
        if kernel_release(profile.os.kernel_suite):  # the run-parts shim: see replace_kernel
            inputs += [boothook.RUN_PARTS, boothook.DPKG_PATH]
        suite = (profile.os.kernel_suite if kernel_release(profile.os.kernel_suite)
                 else profile.os.kernel_suite.rsplit("-", 1)[-1])  # base-bookworm-backports-…
        return f"base-{SUITE}-{suite}-{vm.ARCH}-{_digest(inputs)[:12]}"
    inputs = [SUITE, vm.ARCH, MIRROR, vm.PACKAGES, FIRST_BOOT_PACKAGES,
              profile.os.kernel_packages, [], vm.INITRAMFS_MODULES, RECIPE]
    return f"base-{SUITE}-{vm.ARCH}-{_digest(inputs)[:12]}"


def release_kernel(profile: DeviceProfile) -> DeviceProfile:
    """The same profile with the release's own kernel (no kernel_suite)."""
    return profile.model_copy(update={"os": profile.os.model_copy(
        update={"kernel_suite": None})})


def playbooks_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in playbooks_dir().rglob("*")
                       if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(playbooks_dir())).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def provisioned_key(profile: DeviceProfile, host_vars: dict[str, Any],
                    tags: list[str] | None = None) -> str:
    dump = profile.model_dump(mode="json")
    for later in ("kernel_suite", "initramfs_modules"):  # fields added later: when unset, the
        if dump["os"].get(later) is None:                 # keys of roots cached before stay
            dump["os"].pop(later, None)
    inputs = [base_key(profile), dump, host_vars, sorted(tags or []), playbooks_digest()]
    if board_initramfs(profile):
        inputs.append(board_initramfs(profile))
    return f"provisioned-{profile.name}-{_digest(inputs)[:12]}"


def _cached(key: str, progress: Progress, make: Callable[[Path, Path], None]) -> Path:
    """roots_dir()/key/root, made by `make(root, log)` under a lock unless already there."""
    final = roots_dir() / key
    if (final / "meta.json").exists():
        progress(f"cached root {key}")
        os.utime(final / "meta.json")  # recently used: kept by the pruning below
        return final / "root"
    roots_dir().mkdir(parents=True, exist_ok=True)
    with open(roots_dir() / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; a second caller waits for it
        if (final / "meta.json").exists():
            return final / "root"
        for stale in roots_dir().glob(".build-*"):  # killed before their cleanup
            remove_tree(stale)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=roots_dir()))
        log = work / "build.log"
        try:
            started = time.monotonic()
            make(work / "root", log)
            (work / "meta.json").write_text(json.dumps(
                {"key": key, "build_seconds": round(time.monotonic() - started, 1),
                 "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2) + "\n")
            work.rename(final)
            _prune(key)
        except BaseException:
            if log.exists():
                last_log().parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(log, last_log())
            raise
        finally:
            remove_tree(work)
    return final / "root"


def _prune(key: str) -> None:
    """Roots of the same kind beyond the KEEP most recently used go (each is ~1-2 GB)."""
    kind = key.rsplit("-", 1)[0]
    same = sorted((p for p in roots_dir().glob(f"{kind}-*") if (p / "meta.json").exists()),
                  key=lambda p: (p / "meta.json").stat().st_mtime, reverse=True)
    for old in same[KEEP:]:
        remove_tree(old)


def remove_tree(path: Path) -> None:
    """Unmount anything left under `path` (a chroot's /proc…), then remove it with rm -rf
    --one-file-system: a root tree has ~60k files, which shutil.rmtree takes a minute over."""
    proc = start_removing(path)
    if proc is not None:
        proc.wait()


def start_removing(path: Path) -> subprocess.Popen | None:
    """remove_tree in the background (the caller waits for it): deleting a root tree costs
    as much as copying it, and overlaps with hashing the image."""
    if not path.exists():
        return None
    vm._unmount_under(path)
    if vm._mounts_under(path):
        vm._remove_tree(path)  # refuses, naming what is still mounted
    return subprocess.Popen(["rm", "-rf", "--one-file-system", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def copy_tree(src: Path, dst: Path) -> None:
    """A copy keeping owners, modes, links, hard links and xattrs (file capabilities)."""
    done = subprocess.run(["cp", "-a", "--reflink=auto", str(src), str(dst)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise ClawError(f"copying the root tree failed: {done.stderr.strip()[-300:]}")


def base_root(profile: DeviceProfile, progress: Progress) -> Path:
    """debootstrap + kernel; a profile with os.kernel_suite starts from a copy of the release's
    base (one debootstrap for every profile, ~13 min under qemu-user) and swaps its kernel."""
    if profile.os.kernel_suite:
        release = base_root(release_kernel(profile), progress)  # outside the lock _cached holds

        def swap(root: Path, log: Path) -> None:
            progress("copying the base root")
            copy_tree(release, root)
            replace_kernel(root, profile.os.kernel_packages, profile.os.kernel_suite, log,
                           progress)
        return _cached(base_key(profile), progress, swap)

    def make(root: Path, log: Path) -> None:
        vm._check_build_tools()
        vm.bootstrap_root(root, log, progress, packages=[*vm.PACKAGES, *FIRST_BOOT_PACKAGES],
                          kernel_packages=profile.os.kernel_packages, saved_log=last_log())
    return _cached(base_key(profile), progress, make)


def kernel_release(suite: str) -> str | None:
    """trixie for trixie-backports on a bookworm root: the release a newer kernel belongs to;
    None when the suite is the root's own release's (bookworm-backports)."""
    release = suite.removesuffix("-backports")
    return None if release == SUITE else release


def release_pin(release: str) -> str:
    """apt preferences that keep a bookworm root on bookworm with the next release's sources
    present: that release at 100, like a backports suite (installed packages from it follow
    its updates; nothing else is taken from it). Its backports suite is NotAutomatic +
    ButAutomaticUpgrades already: 100 too."""
    return (f"# Written by ClawForge (claw os build): the kernel comes from {release}-backports\n"
            f"# (see /etc/apt/sources.list); {SUITE} stays the source of everything else.\n"
            f"Package: *\nPin: release n={release}\nPin-Priority: 100\n")


def replace_kernel(root: Path, packages: list[str], suite: str, log: Path,
                   progress: Progress) -> None:
    """The kernel packages from `suite` (added to the root's sources), then the release's
    kernel purged: the image holds one kernel and one initrd. A suite of the next release
    (trixie-backports on bookworm) also adds that release, pinned low (release_pin), and
    /usr/local/sbin/run-parts, which runs the several hook directories that release's
    linux-run-hooks passes (boothook.RUN_PARTS): bookworm's run-parts takes one."""
    progress(f"installing {', '.join(packages)} from {suite}")
    before = {p.name for p in (root / "boot").glob("vmlinuz-*")}
    release = kernel_release(suite)
    with open(root / "etc/apt/sources.list", "a") as sources:
        if release:
            sources.write(f"deb {MIRROR} {release} main\n")
        sources.write(f"deb {MIRROR} {suite} main\n")
    if release:
        (root / "etc/apt/preferences.d").mkdir(parents=True, exist_ok=True)
        (root / f"etc/apt/preferences.d/claw-{release}").write_text(release_pin(release))
        boothook.install_run_parts(root)
    env = ["env", "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C.UTF-8",
           "PATH=/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"]
    with chroot_session(root):
        def apt(*args: str) -> None:
            vm._run(["chroot", str(root), *env, "apt-get", *args], log,
                    f"apt-get {args[0]} ({suite})", timeout=1800, saved_log=last_log())
        apt("update")
        apt("install", "-y", "--no-install-recommends", "-t", suite, *packages)
        old = [f"linux-image-{name.removeprefix('vmlinuz-')}" for name in before]
        if {p.name for p in (root / "boot").glob("vmlinuz-*")} - before:
            apt("purge", "-y", *old)
        apt("clean")


def provisioned_root(profile: DeviceProfile, host_vars: dict[str, Any], progress: Progress,
                     on_event: Callable[[dict[str, Any]], None] | None = None,
                     tags: list[str] | None = None) -> Path:
    base = base_root(profile, progress)

    def make(root: Path, log: Path) -> None:
        progress("copying the base root")
        copy_tree(base, root)
        if profile.os.firmware_packages:
            install_packages(root, profile.os.firmware_packages, log, progress)
        if board_initramfs(profile):
            rebuild_initramfs(root, board_initramfs(profile), log, progress)
        progress("applying the provisioning roles offline (chroot connection)")
        apply_roles(root, profile.name, host_vars, log, on_event, tags)
    return _cached(provisioned_key(profile, host_vars, tags), progress, make)


def board_initramfs(profile: DeviceProfile) -> str | list[str] | None:
    """What a real board's initramfs needs beyond the base's `list` (virtio only, for QEMU):
    the profile's os.initramfs_modules when it names them (a board whose drivers are known:
    one quick MODULES=list build); else `most` for UEFI and U-Boot boards, whose root may sit
    on NVMe, SATA, USB, eMMC or SD (every storage driver: ~1500 modules, 15-30 min under
    qemu-user). None: keep the base's."""
    if profile.os.initramfs_modules is not None:
        return profile.os.initramfs_modules or None
    return "most" if profile.os.bootloader in ("uefi", "u-boot") else None


def rebuild_initramfs(root: Path, modules: str | list[str], log: Path,
                      progress: Progress) -> None:
    """MODULES=most, or the named modules added to the base's MODULES=list."""
    if isinstance(modules, list):
        progress(f"rebuilding the initramfs with the board's modules: {', '.join(modules)}")
        with open(root / "etc/initramfs-tools/modules", "a") as listed:
            listed.write("\n".join(modules) + "\n")
    else:
        progress(f"rebuilding the initramfs with MODULES={modules} (storage drivers of real "
                 "boards)")
        conf = root / "etc/initramfs-tools/initramfs.conf"
        lines = [ln for ln in conf.read_text().splitlines() if not ln.startswith("MODULES=")]
        conf.write_text("\n".join([*lines, f"MODULES={modules}"]) + "\n")
    with chroot_session(root):
        vm._run(["chroot", str(root), "env", "LC_ALL=C.UTF-8", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                 "update-initramfs", "-u", "-k", "all"], log, "update-initramfs", timeout=1800,
                saved_log=last_log())


def install_packages(root: Path, packages: list[str], log: Path, progress: Progress) -> None:
    """The board's firmware/bootloader packages into the root (its apt lists are debootstrap's)."""
    progress(f"installing {', '.join(packages)}")
    env = ["env", "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C.UTF-8",
           "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
    with chroot_session(root):
        vm._run(["chroot", str(root), *env, "apt-get", "install", "-y",
                 "--no-install-recommends", *packages], log, f"installing {', '.join(packages)}",
                timeout=1800, saved_log=last_log())


@contextlib.contextmanager
def chroot_session(root: Path) -> Iterator[None]:
    """What package scripts need inside the root (/proc, /sys, /dev, the build's DNS), and no
    daemon started by them (policy-rc.d); everything put back afterwards, even on failure."""
    policy = root / "usr/sbin/policy-rc.d"
    resolv = root / "etc/resolv.conf"
    saved = resolv.with_name("resolv.conf.claw-saved")
    if resolv.is_symlink() or resolv.exists():
        resolv.rename(saved)
    shutil.copy("/etc/resolv.conf", resolv)
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    try:
        with vm._chroot_mounts(root):
            yield
    finally:
        policy.unlink(missing_ok=True)
        resolv.unlink(missing_ok=True)
        if saved.is_symlink() or saved.exists():
            saved.rename(resolv)


def apply_roles(root: Path, profile: str, host_vars: dict[str, Any], log: Path,
                on_event: Callable[[dict[str, Any]], None] | None = None,
                tags: list[str] | None = None) -> None:
    """playbooks/site.yml on the root tree, through the chroot connection, persistent part
    only (claw_offline, and the roles detect the chroot connection themselves)."""
    from provision.provisioning import provision

    inventory = log.parent / "os-image-inventory.yml"
    host = {"ansible_host": str(root.resolve()), "ansible_connection": "chroot",
            "ansible_become": False, "ansible_python_interpreter": "/usr/bin/python3",
            "claw_profile": profile, "claw_offline": True, **host_vars}
    inventory.write_text(yaml.safe_dump({"all": {"hosts": {HOST: host}}}))
    with chroot_session(root):
        result, records = provision(inventory, on_event=on_event, tags=tags)
    with open(log, "a") as out:
        out.write(json.dumps({"provision": records, "artifacts": str(result.artifacts)},
                             indent=2) + "\n")
    record = records[0] if records else {}
    if result.rc != 0 or record.get("status") != "ok":
        raise ClawError(f"provisioning the image failed at {record.get('failed_task')!r}: "
                        f"{record.get('message') or result.status} "
                        f"(artifacts: {result.artifacts})")
    # The apt lists and caches the roles fetched are of no use on the device.
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
