"""The QEMU arm64 VM: a real Debian arm64 kernel under TCG, reached over SSH like a board.

Containers cannot show kernel-level settings honestly (zram devices, hugepages, sysctl), so the
`e2e` tier provisions this VM instead. Its image is three files, cached under the state
directory by a hash of its inputs: Debian's arm64 kernel, a small initramfs and a raw ext4 root
filesystem made from a debootstrap root (`mkfs.ext4 -d`, no loop devices). A VM boots from them
with `-kernel/-initrd` on QEMU's `virt` machine; each VM writes to its own copy-on-write overlay,
so the cached root stays pristine. SSH on a loopback port is forwarded to the guest's port 22.

Building the kernel into the root is the slow part under qemu-user: installing
`linux-image-arm64` with Debian's default `MODULES=most` builds an initramfs with nearly every
module in it. The recipe sets `MODULES=list` (and the few modules boot needs) before the kernel
is installed, so dpkg builds one small initramfs, once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from images.base import MIRROR, SUITE
from provision import loopback
from provision.errors import BadInput, ClawError
from provision.loopback import port_free, ssh_banner, ssh_key
from provision.paths import state_dir
from provision.profiles import DeviceProfile, ProfileStore

ARCH = "arm64"
PACKAGES = ["systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "sudo", "kmod",
            "iproute2", "procps", "ca-certificates", "udev", "initramfs-tools"]
KERNEL_PACKAGE = "linux-image-arm64"
# What the initramfs needs to mount /dev/vda on QEMU's virt machine (MODULES=list).
INITRAMFS_MODULES = ["virtio_pci", "virtio_mmio", "virtio_blk", "virtio_net", "ext4",
                     "crc32c_generic"]
ROOTFS_SIZE = "3G"
HOSTNAME = "claw-vm"
RECIPE = 1  # bump when the way the image is made changes
QEMU = "qemu-system-aarch64"
KERNEL_CMDLINE = "root=/dev/vda rw console=ttyAMA0 net.ifnames=0"
FIRST_PORT = 2222
PROFILE = "qemu-virt"
# ~40 s is typical under TCG on 2 cores; a busy machine is slower (CLAW_VM_BOOT_TIMEOUT: the
# test run sets it while QEMU shares the cores with another pytest)
BOOT_TIMEOUT = float(os.environ.get("CLAW_VM_BOOT_TIMEOUT", "240"))
SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]

Progress = Callable[[str], None]


def vm_dir() -> Path:
    return state_dir() / "vm"


def instances_dir() -> Path:
    return vm_dir() / "instances"


def inventory_path() -> Path:
    return vm_dir() / "inventory.yml"


# ---------------------------------------------------------------------------------------------
# The image


@dataclass(frozen=True)
class VmImage:
    kernel: Path
    initrd: Path
    rootfs: Path

    @property
    def dir(self) -> Path:
        return self.rootfs.parent


def image_key() -> str:
    """The cache key: everything that goes into the image, the root's SSH key included."""
    pub = Path(f"{ssh_key()}.pub").read_text().strip()
    from provision.osimage.rootfs import base_key
    inputs = [base_key(_os_profile()), ROOTFS_SIZE, HOSTNAME, KERNEL_CMDLINE, RECIPE, pub]
    digest = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()
    return f"{SUITE}-{ARCH}-{digest[:12]}"


def _image_in(path: Path) -> VmImage:
    return VmImage(path / "vmlinuz", path / "initrd.img", path / "rootfs.img")


def ensure_vm_image(progress: Progress = print) -> VmImage:
    """The VM image (kernel, initrd, root filesystem), built unless cached by its inputs."""
    final = vm_dir() / image_key()
    image = _image_in(final)
    if (final / "image.json").exists():
        return image
    _check_build_tools()
    vm_dir().mkdir(parents=True, exist_ok=True)
    with open(vm_dir() / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; a second caller waits for it
        if (final / "image.json").exists():
            return image
        _remove_stale_builds()
        work = Path(tempfile.mkdtemp(prefix="build-", dir=vm_dir()))
        try:
            started = time.monotonic()
            _build(work, progress)
            out = _image_in(work / "image")
            meta = {"suite": SUITE, "arch": ARCH, "packages": PACKAGES,
                    "kernel_version": (work / "image" / "kernel-version").read_text().strip(),
                    "recipe": RECIPE, "build_seconds": round(time.monotonic() - started, 1),
                    "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (work / "image" / "image.json").write_text(json.dumps(meta, indent=2) + "\n")
            for path in (out.kernel, out.initrd, out.rootfs):
                if not path.is_file():
                    raise ClawError(f"the VM image build did not produce {path.name}")
            shutil.copy(work / "build.log", work / "image" / "build.log")
            (work / "image").rename(final)
            (vm_dir() / "last-build.log").unlink(missing_ok=True)
            _prune_images(keep=final)
        except BaseException:
            log = work / "build.log"
            if log.exists():
                shutil.copy(log, vm_dir() / "last-build.log")
            raise
        finally:
            _unmount_under(work)
            _remove_tree(work)
    return image


def _prune_images(keep: Path) -> None:
    """Images of older inputs go, unless a running VM still boots from one."""
    in_use = set()
    for vm in list_vms():
        with contextlib.suppress(OSError, ValueError, KeyError):
            in_use.add(Path(json.loads((vm.dir / "vm.json").read_text())["rootfs"]).parent)
    for old in vm_dir().glob(f"{SUITE}-{ARCH}-*"):
        if old != keep and old not in in_use and (old / "image.json").exists():
            shutil.rmtree(old, ignore_errors=True)


def _check_build_tools() -> None:
    for tool, package in (("debootstrap", "debootstrap"), ("mkfs.ext4", "e2fsprogs"),
                          ("chroot", "coreutils"), ("mount", "mount")):
        if shutil.which(tool) is None:
            raise ClawError(f"{tool} is not installed (apt-get install {package}; "
                            "see `claw doctor`)")
    if os.uname().machine not in ("aarch64", "arm64"):
        entry = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
        if not entry.exists() or not entry.read_text().startswith("enabled"):
            raise ClawError("arm64 programs cannot run here: qemu-aarch64 is not registered "
                            "with binfmt_misc (apt-get install qemu-user-static binfmt-support; "
                            "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; "
                            "update-binfmts --enable qemu-aarch64; see `claw doctor`)")


def bootstrap_root(root: Path, log: Path, progress: Progress,
                   packages: list[str] = PACKAGES, kernel_packages: list[str] | None = None,
                   initramfs_modules: list[str] = INITRAMFS_MODULES,
                   saved_log: Path | None = None) -> None:
    """An arm64 Debian root with the kernel installed: debootstrap, then the kernel after a
    `MODULES=list` initramfs config (one small initramfs, built once). Shared with `claw os`."""
    kernel_packages = kernel_packages or [KERNEL_PACKAGE]
    t0 = time.monotonic()
    progress(f"debootstrap {SUITE} {ARCH} with systemd and sshd (about 3 min)")
    _run(["debootstrap", f"--arch={ARCH}", "--variant=minbase",
          f"--include={','.join(packages)}", SUITE, str(root), MIRROR], log, "debootstrap",
         timeout=1800, saved_log=saved_log)

    # Before the kernel arrives: one small initramfs, built once by the kernel's postinst.
    conf = root / "etc/initramfs-tools/initramfs.conf"
    text = conf.read_text()
    for key, value in (("MODULES", "list"), ("COMPRESS", "gzip")):
        lines = [ln for ln in text.splitlines() if not ln.startswith(f"{key}=")]
        text = "\n".join([*lines, f"{key}={value}"]) + "\n"
    conf.write_text(text)
    with open(root / "etc/initramfs-tools/modules", "a") as modules:
        modules.write("\n".join(initramfs_modules) + "\n")
    (root / "etc/apt/sources.list").write_text(f"deb {MIRROR} {SUITE} main\n")
    (root / "etc/resolv.conf").unlink(missing_ok=True)
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")  # the build's DNS
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")  # no daemon starts inside the build
    policy.chmod(0o755)

    t1 = time.monotonic()
    progress(f"debootstrap took {t1 - t0:.0f} s; installing {', '.join(kernel_packages)} "
             "(about 1 min)")
    env = ["env", "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C.UTF-8",
           "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
    with _chroot_mounts(root):
        # debootstrap leaves bookworm's package lists in the root: no `apt-get update` needed.
        _run(["chroot", str(root), *env, "apt-get", "install", "-y", "--no-install-recommends",
              *kernel_packages], log, f"installing {', '.join(kernel_packages)}", timeout=1800,
             saved_log=saved_log)
        _run(["chroot", str(root), *env, "systemctl", "enable", "systemd-networkd"], log,
             "enabling systemd-networkd", timeout=300, saved_log=saved_log)
        _run(["chroot", str(root), *env, "apt-get", "clean"], log, "apt-get clean", timeout=300,
             saved_log=saved_log)
    policy.unlink()


def _os_profile() -> DeviceProfile:
    return ProfileStore().get("qemu-virt")


def _build(work: Path, progress: Progress) -> None:
    """The VM's root is a copy of the cached base root `claw os build qemu-virt` starts from:
    one debootstrap (the slow part, ~10 min under qemu-user) serves both."""
    from provision.osimage.rootfs import base_root, copy_tree

    root, out, log = work / "root", work / "image", work / "build.log"
    out.mkdir()
    t0 = time.monotonic()
    copy_tree(base_root(_os_profile(), progress), root)

    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    initrds = sorted((root / "boot").glob("initrd.img-*"))
    if len(kernels) != 1 or len(initrds) != 1:
        raise ClawError(f"expected one kernel and one initrd in the root's /boot, found "
                        f"{[p.name for p in kernels + initrds]} "
                        f"(see {vm_dir() / 'last-build.log'})")
    shutil.copy(kernels[0], out / "vmlinuz")
    shutil.copy(initrds[0], out / "initrd.img")
    (out / "kernel-version").write_text(kernels[0].name.removeprefix("vmlinuz-") + "\n")

    _configure_root(root)
    t2 = time.monotonic()
    progress(f"root and kernel took {t2 - t0:.0f} s; making the {ROOTFS_SIZE} ext4 root filesystem")
    rootfs = out / "rootfs.img"
    _run(["truncate", "-s", ROOTFS_SIZE, str(rootfs)], log, "truncate")
    _run(["mkfs.ext4", "-q", "-F", "-L", "claw-root", "-d", str(root), str(rootfs)], log,
         "mkfs.ext4 -d", timeout=900)
    progress(f"root filesystem took {time.monotonic() - t2:.0f} s")


def _configure_root(root: Path) -> None:
    """First-boot configuration: hostname, network (DHCP), SSH key login for root."""
    etc = root / "etc"
    (etc / "fstab").write_text("/dev/vda / ext4 defaults 0 1\n")
    (etc / "hostname").write_text(f"{HOSTNAME}\n")
    (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n"
                               "::1\tlocalhost ip6-localhost ip6-loopback\n")
    network = etc / "systemd/network/20-eth0.network"
    network.parent.mkdir(parents=True, exist_ok=True)
    network.write_text("[Match]\nName=eth0\n\n[Network]\nDHCP=yes\n")
    # QEMU's user-mode network answers DNS on 10.0.2.3; there is no resolved in minbase.
    (etc / "resolv.conf").unlink(missing_ok=True)
    (etc / "resolv.conf").write_text("nameserver 10.0.2.3\n")
    sshd = etc / "ssh/sshd_config.d/claw.conf"
    sshd.write_text("PermitRootLogin prohibit-password\nPasswordAuthentication no\n")
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    keys = ssh_dir / "authorized_keys"
    keys.write_text(Path(f"{ssh_key()}.pub").read_text())
    keys.chmod(0o600)
    # An empty machine-id: each VM's systemd makes its own on first boot and commits it.
    (etc / "machine-id").write_text("")
    # The first-boot wizard would wait for answers on the serial console.
    masked = etc / "systemd/system/systemd-firstboot.service"
    masked.unlink(missing_ok=True)
    masked.symlink_to("/dev/null")


def _run(argv: list[str], log: Path, what: str, timeout: float = 600,
         saved_log: Path | None = None) -> None:
    """Run a build step, its output appended to the build log; stop it cleanly if interrupted.
    `saved_log` is where the caller keeps the log of a failed build (named in the error)."""
    saved_log = saved_log or vm_dir() / "last-build.log"
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        # Its own process group, so that a stop reaches dpkg and friends under the chroot too.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except BaseException as exc:  # timeout, Ctrl-C, pytest-timeout: never leave it running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # debootstrap's traps unmount its mounts
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if isinstance(exc, subprocess.TimeoutExpired):
                raise ClawError(f"{what} did not finish in {timeout:.0f} s "
                                f"(log: {saved_log})") from None
            raise
    if code != 0:
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-4:])
        raise ClawError(f"{what} failed (exit {code}): {tail} "
                        f"(whole log: {saved_log})")


@contextlib.contextmanager
def _chroot_mounts(root: Path) -> Iterator[None]:
    """/proc, /sys, /dev and /dev/pts for a chroot; always unmounted again, even on failure."""
    mounted: list[Path] = []
    try:
        for argv, target in ((["-t", "proc", "proc"], "proc"), (["-t", "sysfs", "sys"], "sys"),
                             (["--bind", "/dev"], "dev"), (["--bind", "/dev/pts"], "dev/pts")):
            path = root / target
            path.mkdir(parents=True, exist_ok=True)
            done = subprocess.run(["mount", *argv, str(path)], capture_output=True, text=True)
            if done.returncode != 0:
                raise ClawError(f"cannot mount {target} for the chroot: {done.stderr.strip()}")
            mounted.append(path)
        yield
    finally:
        for path in reversed(mounted):
            _umount(path)


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)  # busy: detach it


def _mounts_under(path: Path) -> list[Path]:
    prefix = str(path.resolve())
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4])
        if point == prefix or point.startswith(prefix + "/"):
            found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _unmount_under(path: Path) -> None:
    for point in _mounts_under(path):
        _umount(point)


def _remove_tree(path: Path) -> None:
    """rmtree, but never through a mount point (a bound /dev would lose the host's nodes)."""
    if not path.exists():
        return
    left = _mounts_under(path)
    if left:
        raise ClawError(f"not removing {path}: still mounted there: "
                        f"{', '.join(map(str, left))} (unmount them, then remove it)")
    shutil.rmtree(path, ignore_errors=True)


def _remove_stale_builds() -> None:
    """Builds killed before their cleanup (we hold the build lock: none is running)."""
    for stale in vm_dir().glob("build-*"):
        _unmount_under(stale)
        _remove_tree(stale)


# ---------------------------------------------------------------------------------------------
# Running VMs


@dataclass
class Vm:
    name: str
    port: int
    pid: int
    dir: Path
    memory_mb: int = 2048
    cpus: int = 2
    status: str = "running"
    user: str = "root"
    key: Path | None = None  # None: the controller's key (provision.loopback.ssh_key)
    _proc: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    @property
    def disk(self) -> Path:
        for name in ("overlay.qcow2", "disk.img"):
            if (self.dir / name).exists():
                return self.dir / name
        return self.dir / "overlay.qcow2"

    def running(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return _qemu_alive(self.pid, self.dir)

    def ssh_command(self) -> list[str]:
        return ["ssh", "-i", str(self.key or ssh_key()), "-p", str(self.port), *SSH_OPTS,
                f"{self.user}@127.0.0.1"]

    def ssh(self, cmd: str, check: bool = False, timeout: float = 300,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run `cmd` in the VM as root over SSH; ClawError with its output if `check` fails."""
        try:
            done = subprocess.run([*self.ssh_command(), cmd], capture_output=True, text=True,
                                  timeout=timeout, input=input,
                                  stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ClawError(f"{self.name}: `{cmd}` did not finish in {timeout:.0f} s") from None
        if check and done.returncode != 0:
            raise ClawError(f"{self.name}: `{cmd}` failed (exit {done.returncode}): "
                            f"{(done.stderr or done.stdout).strip()[-400:]}")
        return done

    def wait_for_ssh(self, timeout: float = BOOT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise ClawError(f"{self.name}: QEMU exited while booting; console log "
                                f"{self.console_log}:\n{self.console_tail()}")
            if ssh_banner(self.port) and self.ssh("true", timeout=30).returncode == 0:
                return
            time.sleep(1)
        raise ClawError(f"{self.name} did not answer SSH on 127.0.0.1:{self.port} within "
                        f"{timeout:.0f} s; console log {self.console_log} ends with:\n"
                        f"{self.console_tail()}")

    def boot_id(self) -> str | None:
        try:
            done = self.ssh("cat /proc/sys/kernel/random/boot_id", timeout=20)
        except ClawError:
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    def reboot(self, wait: bool = True, timeout: float = BOOT_TIMEOUT) -> None:
        """`systemctl reboot` in the guest; with `wait`, until SSH answers from the new boot."""
        before = self.boot_id()
        if before is None:
            raise ClawError(f"{self.name} does not answer SSH; cannot reboot it")
        self.ssh("systemctl reboot", timeout=30)  # the connection may drop: that is fine
        if not wait:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise ClawError(f"{self.name}: QEMU exited during the reboot; console log "
                                f"{self.console_log}:\n{self.console_tail()}")
            if ssh_banner(self.port):
                now = self.boot_id()
                if now is not None and now != before:
                    return
            time.sleep(1)
        raise ClawError(f"{self.name} did not come back on SSH within {timeout:.0f} s of the "
                        f"reboot; console log {self.console_log} ends with:\n"
                        f"{self.console_tail()}")

    def stop(self, timeout: float = 0) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL) and drop the overlay. The disk is a throwaway
        overlay deleted here, so the guest has nothing worth flushing: a graceful poweroff
        (`timeout` > 0 waits that long for one) only costs time, ~60 s under TCG."""
        if self.running() and timeout > 0:
            with contextlib.suppress(ClawError):
                self.ssh("systemctl poweroff", timeout=15)
            deadline = time.monotonic() + timeout
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.5)
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            if not self.running():
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            end = time.monotonic() + grace
            while self.running() and time.monotonic() < end:
                time.sleep(0.2)
        if self.running():
            raise ClawError(f"{self.name}: QEMU (pid {self.pid}) would not exit")
        for name in ("overlay.qcow2", "disk.img", "vm.json", "qemu.pid"):
            (self.dir / name).unlink(missing_ok=True)
        self.status = "stopped"
        write_inventory()

    def console_tail(self, lines: int = 15) -> str:
        if not self.console_log.exists():
            return "(no console output)"
        text = self.console_log.read_bytes()[-16384:].decode("utf-8", errors="replace")
        return "\n".join(text.replace("\r", "").strip().splitlines()[-lines:])

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "address": f"127.0.0.1:{self.port}", "status": self.status,
                "memory_mb": self.memory_mb, "cpus": self.cpus, "pid": self.pid,
                "console_log": str(self.console_log)}


def _qemu_alive(pid: int, vm_path: Path) -> bool:
    """Is `pid` still this VM's QEMU (not a zombie, not a recycled pid)?"""
    with contextlib.suppress(ChildProcessError):
        reaped, _ = os.waitpid(pid, os.WNOHANG)  # our own child: reap it if it has exited
        if reaped == pid:
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X") and QEMU in cmdline and str(vm_path) in cmdline


def _load(path: Path) -> Vm | None:
    try:
        meta = json.loads((path / "vm.json").read_text())
        vm = Vm(meta["name"], int(meta["port"]), int(meta["pid"]), path,
                int(meta.get("memory_mb", 2048)), int(meta.get("cpus", 2)),
                user=meta.get("user", "root"), key=Path(meta["key"]) if meta.get("key") else None)
    except (OSError, ValueError, KeyError):
        return None
    vm.status = "running" if vm.running() else "stopped"
    return vm


def list_vms() -> list[Vm]:
    """Every VM with a record, running or stopped (a stopped one died without `stop`)."""
    if not instances_dir().is_dir():
        return []
    vms = [vm for path in sorted(instances_dir().iterdir()) if (vm := _load(path))]
    return sorted(vms, key=lambda v: v.port)


def get_vm(name: str) -> Vm:
    for vm in list_vms():
        if vm.name == name:
            return vm
    names = ", ".join(v.name for v in list_vms()) or "none is running"
    raise BadInput(f"no VM named {name!r} (known: {names})")


def start_vm(image: VmImage, port: int | None = None, memory_mb: int = 2048, cpus: int = 2,
             name: str | None = None, boot_timeout: float = BOOT_TIMEOUT,
             progress: Progress = print, cmdline: str = KERNEL_CMDLINE, user: str = "root",
             key: Path | None = None, disk_size: int | None = None,
             firmware: Path | None = None) -> Vm:
    """Boot a VM from `image` on its own overlay; return once SSH answers with the key.

    A whole disk image (`claw os build`) boots the same way with its own `cmdline`, logging in
    as its `user` with its `key`; `disk_size` makes the overlay a bigger disk than the image.
    With `firmware` (a UEFI build such as QEMU_EFI.fd) the disk boots through its own ESP and
    bootloader, as a board would: image.kernel/initrd and `cmdline` are not used."""
    if shutil.which(QEMU) is None:
        raise ClawError(f"{QEMU} is not installed (apt-get install qemu-system-arm; "
                        "see `claw doctor`)")
    if memory_mb < 512:
        raise BadInput(f"--memory {memory_mb} MB is too small (expected at least 512)")
    if not 1 <= cpus <= 8:
        raise BadInput(f"--cpus {cpus} is not valid (expected 1 to 8)")
    existing = list_vms()
    for vm in existing:
        if vm.status != "running":  # a VM that died without `stop`: forget it
            vm.stop()
    existing = [vm for vm in existing if vm.status == "running"]
    taken = {vm.port for vm in existing}
    if port is None:
        port = FIRST_PORT
        while port in taken or not port_free(port):
            port += 1
    elif port in taken or not port_free(port):
        raise BadInput(f"--port {port} is in use on 127.0.0.1 (leave it out to pick a free one)")
    if name is None:
        index, names = 1, {vm.name for vm in existing}
        while f"claw-vm-{index}" in names:
            index += 1
        name = f"claw-vm-{index}"
    elif name in {vm.name for vm in existing}:
        raise BadInput(f"a VM named {name!r} is already running")

    path = instances_dir() / name
    path.mkdir(parents=True, exist_ok=True)
    for old in ("overlay.qcow2", "disk.img", "console.log", "vm.json"):
        (path / old).unlink(missing_ok=True)
    if shutil.which("qemu-img"):
        disk, fmt = path / "overlay.qcow2", "qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b",
                        str(image.rootfs.resolve()), "-F", "raw", str(disk),
                        *([str(disk_size)] if disk_size else [])],
                       check=True, capture_output=True)
    else:  # no qemu-utils: a sparse copy (3 GiB apparent, only the used blocks written)
        disk, fmt = path / "disk.img", "raw"
        subprocess.run(["cp", "--sparse=always", str(image.rootfs), str(disk)], check=True,
                       capture_output=True)
        if disk_size:
            os.truncate(disk, max(disk_size, disk.stat().st_size))
    argv = [QEMU, "-M", "virt", "-cpu", "max,pauth-impdef=on", "-m", str(memory_mb),
            "-smp", str(cpus), "-nographic",
            *(["-bios", str(firmware)] if firmware else
              ["-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", cmdline]),
            "-drive", f"file={disk},if=virtio,format={fmt}",
            "-netdev", f"user,id=n,hostfwd=tcp:127.0.0.1:{port}-:22",
            "-device", "virtio-net-pci,netdev=n,romfile=",
            "-name", name]
    progress(f"booting {name} (arm64, TCG) on 127.0.0.1:{port}; console: {path / 'console.log'}")
    with open(path / "console.log", "wb") as console:
        # Its own session: the VM outlives the `claw vm up` that started it.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console,
                                stderr=subprocess.STDOUT, cwd=path, start_new_session=True)
    (path / "qemu.pid").write_text(f"{proc.pid}\n")
    vm = Vm(name, port, proc.pid, path, memory_mb, cpus, user=user, key=key, _proc=proc)
    (path / "vm.json").write_text(json.dumps(
        {"name": name, "port": port, "pid": proc.pid, "memory_mb": memory_mb, "cpus": cpus,
         "kernel": str(image.kernel), "initrd": str(image.initrd), "rootfs": str(image.rootfs),
         "disk": str(disk), "argv": argv, "started": time.time(), "user": user,
         "key": str(key) if key else None}, indent=2) + "\n")
    try:
        vm.wait_for_ssh(boot_timeout)
    except BaseException:
        with contextlib.suppress(Exception):
            vm.stop()  # keeps console.log for the post-mortem
        raise
    write_inventory()
    return vm


def stop_vms(names: list[str] | None = None) -> list[str]:
    stopped = []
    for vm in list_vms():
        if names and vm.name not in names:
            continue
        vm.stop()
        stopped.append(vm.name)
    if names:
        unknown = sorted(set(names) - set(stopped))
        if unknown:
            raise BadInput(f"no VM named {', '.join(unknown)} (stopped: "
                           f"{', '.join(stopped) or 'none'})")
    return stopped


def write_inventory(path: Path | None = None) -> Path:
    """An Ansible inventory of the running VMs, ready for `claw provision -i`."""
    from provision.profiles import ProfileStore

    path = path or inventory_path()
    running = [vm for vm in list_vms() if vm.status == "running"]
    if not running and path == inventory_path():
        path.unlink(missing_ok=True)
        return path
    ram_options = ProfileStore().get(PROFILE).ram_gb
    hosts: dict[str, dict[str, Any]] = {}
    for vm in running:
        host: dict[str, Any] = {"ansible_port": vm.port}
        if vm.memory_mb % 1024 == 0 and vm.memory_mb // 1024 in ram_options:
            host["claw_ram_gb"] = vm.memory_mb // 1024
        hosts[vm.name] = host
    return loopback.write_inventory(path, "qemu_vms", hosts, {"claw_profile": PROFILE})
