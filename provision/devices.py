"""Emulated devices: Debian bookworm containers that Ansible reaches exactly like real boards.

Each device runs systemd as PID 1 and sshd with key login on its own loopback port. The
containers share the host's network namespace (this machine has no Docker bridge, and nothing
but loopback may be a target), so a device is `127.0.0.1:PORT`. Base images come from a
debootstrap root (`docker import`), because no registry can be reached; they are cached by
their inputs. Kernel-level settings cannot be shown honestly in a container (its /proc/sys is
read-only and shared with the host): those are checked on the QEMU VM instead.

Engine devices (`engine=True`) start from a second base that also carries Debian's docker.io,
for image rollouts: each gets a named volume at /var/lib/docker, so its inner dockerd stores
layers with overlay2 (on the container's own overlay root it falls back to vfs, which copies
every layer: 1 GB images on ten devices would not fit).
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from images.base import BaseRecipe, Progress, docker_client, ensure_base
from provision import loopback
from provision.errors import BadInput, ClawError
from provision.loopback import free_ports, ssh_banner, ssh_key
from provision.paths import state_dir

PACKAGES = ["systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "sudo",
            "ca-certificates", "iproute2", "procps", "kmod"]
RECIPE = 1  # bump when the way a base image is made changes
LABEL = "clawforge.device"
FIRST_PORT = 2200
DEFAULT_FLEET = "dev"
# What a systemd container needs here; --privileged fails on this machine (see DESIGN.md).
SYSTEMD_RUN = dict(
    cap_add=["ALL"], cap_drop=["SYS_RESOURCE"],
    security_opt=["seccomp=unconfined", "apparmor=unconfined"],
    tmpfs={"/run": "", "/run/lock": ""}, environment={"container": "docker"},
    network_mode="host", stop_signal="SIGRTMIN+3",  # systemd's "halt" signal
)

def _docker():
    return docker_client()


def devices_dir() -> Path:
    return state_dir() / "devices"


def _tidy_root(root: Path) -> None:
    """Make the root a device template: an empty machine-id, no getty on a console."""
    (root / "etc/machine-id").write_text("")
    for unit in ("getty@tty1.service", "serial-getty@.service"):
        link = root / "etc/systemd/system" / unit
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to("/dev/null")


DEVICE_BASE = BaseRecipe(repository="clawforge/device-base", packages=PACKAGES, recipe=RECIPE,
                         changes=['CMD ["/lib/systemd/systemd"]'], tidy=_tidy_root)


ENGINE_PACKAGES = [*PACKAGES, "docker.io", "zstd"]  # zstd: `claw image export` tarballs
ENGINE_RECIPE = 1  # bump when the way the engine base is made changes
ENGINE_LABEL = "clawforge.engine"
ENGINE_DATA = "/var/lib/docker"


def _tidy_engine_root(root: Path) -> None:
    """A device template whose engine waits for its configuration: docker.io's postinst
    enables dockerd (and its socket), which at the first boot would make a docker0 bridge and
    NAT rules in the host's network namespace that every device shares. The docker_engine role
    writes daemon.json (no bridge) and enables it."""
    _tidy_root(root)
    for link in ("multi-user.target.wants/docker.service", "sockets.target.wants/docker.socket"):
        (root / "etc/systemd/system" / link).unlink(missing_ok=True)


DEVICE_ENGINE_BASE = BaseRecipe(repository="clawforge/device-engine-base",
                                packages=ENGINE_PACKAGES, recipe=ENGINE_RECIPE,
                                changes=DEVICE_BASE.changes, tidy=_tidy_engine_root)


def _recipe(engine: bool) -> BaseRecipe:
    return DEVICE_ENGINE_BASE if engine else DEVICE_BASE


def base_image_tag(arch: str, engine: bool = False) -> str:
    return _recipe(engine).tag(arch)


def ensure_base_image(arch: str, progress: Progress = print, engine: bool = False) -> str:
    """The device base image for `arch` (with docker.io when `engine`), made from a
    debootstrap root unless cached."""
    return ensure_base(_recipe(engine), arch, progress)


def engine_volume(name: str) -> str:
    """The named volume that holds an engine device's /var/lib/docker."""
    return f"{name}-docker"


@dataclass
class Device:
    name: str
    fleet: str
    port: int
    profile: str
    arch: str
    status: str
    engine: bool = False

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "fleet": self.fleet, "address": f"127.0.0.1:{self.port}",
                "profile": self.profile, "arch": self.arch, "engine": self.engine,
                "status": self.status}


def _check_fleet(fleet: str) -> str:
    if not fleet.replace("-", "").isalnum() or len(fleet) > 32:
        raise BadInput(f"fleet {fleet!r} is not valid (expected letters, digits and '-')")
    return fleet


def list_devices(fleet: str | None = None) -> list[Device]:
    """Emulated devices of one fleet (a named group of them), or of every fleet."""
    client = _docker()
    labels = [LABEL] + ([f"clawforge.fleet={_check_fleet(fleet)}"] if fleet else [])
    out = []
    for c in client.containers.list(all=True, filters={"label": labels}):
        lb = c.labels
        out.append(Device(c.name, lb.get("clawforge.fleet", DEFAULT_FLEET),
                          int(lb["clawforge.port"]), lb["clawforge.profile"],
                          lb["clawforge.arch"], c.status, lb.get(ENGINE_LABEL) == "1"))
    return sorted(out, key=lambda d: d.port)


def inventory_path(fleet: str) -> Path:
    return devices_dir() / f"{fleet}-inventory.yml"


def _wait_for_ssh(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ssh_banner(port):
            return True
        time.sleep(0.3)
    return False


@contextmanager
def _allocation_lock() -> Iterator[None]:
    """Serialise choosing ports and names and creating the containers across processes."""
    devices_dir().mkdir(parents=True, exist_ok=True)
    with open(devices_dir() / ".allocate.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def devices_up(n: int, profile: str, arch: str, inventory: Path | None = None,
               progress: Progress = print, fleet: str = DEFAULT_FLEET,
               engine: bool = False) -> Path:
    """Make `fleet` have `n` devices (starting only the missing ones: running it twice starts
    nothing more) and write an inventory of all of them. With `engine`, each carries Debian's
    Docker engine (installed, not configured: the docker_engine role does that)."""
    _check_fleet(fleet)
    from provision.profiles import ProfileStore

    if n < 1:
        raise BadInput(f"N = {n} is not valid (expected at least 1 device)")
    ProfileStore().get(profile)  # an unknown profile is bad input before anything starts
    with _allocation_lock():  # another `devices up` must not pick the same ports
        every = list_devices()
        other = [d.name for d in every if d.fleet == fleet and d.engine != engine]
        if other:
            has = "without" if engine else "with"
            raise BadInput(f"fleet {fleet!r} has devices {has} a Docker engine "
                           f"({', '.join(other)}): expected all or none of a fleet to have one "
                           f"(`claw devices down --fleet {fleet}`, or use another --fleet)")
        tag = ensure_base_image(arch, progress, engine)
        client = _docker()
        key = ssh_key()
        missing = n - sum(1 for d in every if d.fleet == fleet)
        ports = free_ports(FIRST_PORT, max(missing, 0), {d.port for d in every})
        used = {d.name for d in every}
        index = 1
        for port in ports:
            while f"claw-{fleet}-{index}" in used:
                index += 1
            name = f"claw-{fleet}-{index}"
            used.add(name)
            conf = devices_dir() / f"{name}-sshd.conf"
            conf.write_text(f"Port {port}\nListenAddress 127.0.0.1\n"
                            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n")
            progress(f"starting {name} ({profile}, {arch}{', engine' if engine else ''}) on "
                     f"127.0.0.1:{port}")
            labels = {LABEL: "1", "clawforge.fleet": fleet, "clawforge.port": str(port),
                      "clawforge.profile": profile, "clawforge.arch": arch}
            volumes = {"/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"},
                       str(conf): {"bind": "/etc/ssh/sshd_config.d/claw.conf", "mode": "ro"},
                       f"{key}.pub": {"bind": "/root/.ssh/authorized_keys", "mode": "ro"},
                       **controller_trust()}
            if engine:
                labels[ENGINE_LABEL] = "1"
                volumes[_fresh_engine_volume(client, name, labels)] = {"bind": ENGINE_DATA,
                                                                       "mode": "rw"}
            client.containers.run(tag, ["/lib/systemd/systemd"], name=name, detach=True,
                                  labels=labels, volumes=volumes, **SYSTEMD_RUN)
    for device in list_devices(fleet):
        if device.status != "running":
            progress(f"restarting {device.name}")
            client.containers.get(device.name).start()
    for port in [d.port for d in list_devices(fleet)]:
        if not _wait_for_ssh(port, 90 if arch == "arm64" else 30):
            raise ClawError(f"device on 127.0.0.1:{port} did not answer SSH in time; "
                            f"`docker logs` of its container may say why")
    return write_inventory(fleet, inventory)


def _fresh_engine_volume(client: Any, name: str, labels: dict[str, str]) -> str:
    """An empty volume for a new device's engine: one left by an earlier device of the same
    name (removed without `claw devices down`) would hand it that device's images."""
    _remove_engine_volume(client, name)
    volume = engine_volume(name)
    client.volumes.create(volume, labels=labels)
    return volume


def _remove_engine_volume(client: Any, name: str) -> None:
    import docker

    with contextlib.suppress(docker.errors.NotFound):
        client.volumes.get(engine_volume(name)).remove(force=True)


RUNTIME_PORT_OFFSET = 6000


def controller_trust() -> dict[str, dict[str, str]]:
    """Mounts that let an emulated device's pip trust what this machine trusts.

    The devices share this machine's network, which may reach the package index only through
    a TLS proxy with its own CA (as here); a real device has its own network and trust store.
    pip on the device gets this machine's CA bundle through /etc/pip.conf, nothing else does.
    """
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if not bundle.is_file():
        return {}
    conf = devices_dir() / "pip.conf"
    if not conf.is_file():
        conf.write_text("[global]\ncert = /usr/local/share/clawforge/controller-ca.pem\n")
    return {str(bundle): {"bind": "/usr/local/share/clawforge/controller-ca.pem", "mode": "ro"},
            str(conf): {"bind": "/etc/pip.conf", "mode": "ro"}}


def write_inventory(fleet: str, path: Path | None = None) -> Path:
    """An Ansible inventory of a fleet's emulated devices, ready for `claw provision -i`."""
    path = path or inventory_path(fleet)
    # They share the host's network namespace: their Docker engines must make no bridge, and
    # each runtime service listens on a port of its own (its SSH port + RUNTIME_PORT_OFFSET).
    hosts = {d.name: {"ansible_port": d.port, "claw_profile": d.profile,
                      "claw_runtime_port": d.port + RUNTIME_PORT_OFFSET}
             for d in list_devices(fleet)}
    return loopback.write_inventory(path, "emulated", hosts, {"docker_engine_bridge": "none"})


def devices_down(names: list[str] | None = None, fleet: str = DEFAULT_FLEET) -> list[str]:
    """Remove a fleet's devices (all, or those named), with their engines' volumes; its
    inventory follows."""
    from concurrent.futures import ThreadPoolExecutor

    client = _docker()

    def remove(device: Device) -> str:
        client.containers.get(device.name).remove(force=True)
        if device.engine:
            _remove_engine_volume(client, device.name)
        (devices_dir() / f"{device.name}-sshd.conf").unlink(missing_ok=True)
        return device.name

    chosen = [d for d in list_devices(fleet) if not names or d.name in names]
    # At once, not one after another: the daemon stops a container and deletes an engine's
    # volume (its image layers) mostly waiting on the disk, and ten at once take little more
    # than one.
    with ThreadPoolExecutor(max_workers=min(len(chosen), 8) or 1) as pool:
        removed = list(pool.map(remove, chosen))
    if list_devices(fleet):
        write_inventory(fleet)
    else:
        inventory_path(fleet).unlink(missing_ok=True)
    return removed
