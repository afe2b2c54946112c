"""Observations about the controller machine, for the doctor's knowledge base.

Each probe returns plain facts (`name → value`) and never raises: a probe that cannot look
records what it saw as an error fact instead, so one broken tool never hides the others.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from provision.knowledge import Facts
from provision.paths import state_dir

CAP_SYS_RESOURCE = 24  # linux/capability.h


def _which(name: str) -> str | None:
    """PATH lookup that also sees the tools installed next to this Python (a venv's bin/)."""
    here = str(Path(sys.executable).parent)
    return shutil.which(name) or shutil.which(name, path=here)


def probe_docker() -> Facts:
    facts: Facts = {
        "docker.dockerd_installed": _which("dockerd") is not None,
        "docker.host": os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"),
        "docker.sdk": importlib.util.find_spec("docker") is not None,
    }
    if not facts["docker.sdk"]:
        return facts
    import docker

    try:
        client = docker.from_env(timeout=5)
        version = client.version()
        facts.update({"docker.reachable": True, "docker.error": "",
                      "docker.version": version.get("Version", "?")})
    except Exception as exc:  # the SDK raises many types; all mean "not reachable"
        facts.update({"docker.reachable": False, "docker.error": str(exc).splitlines()[0][:200]})
    return facts


def probe_binfmt() -> Facts:
    root = Path("/proc/sys/fs/binfmt_misc")
    entry = root / "qemu-aarch64"
    registered = entry.exists()
    enabled = registered and entry.read_text().splitlines()[0].strip() == "enabled"
    interpreter = ""
    if registered:
        for line in entry.read_text().splitlines():
            if line.startswith("interpreter "):
                interpreter = line.split(" ", 1)[1]
    return {
        "binfmt.mounted": (root / "register").exists(),
        "binfmt.aarch64_registered": registered,
        "binfmt.aarch64_enabled": enabled,
        "binfmt.aarch64_interpreter": interpreter,
        "binfmt.aarch64_interpreter_present": bool(interpreter) and Path(interpreter).exists(),
    }


def probe_tools() -> Facts:
    return {
        "qemu.user_static": _which("qemu-aarch64-static") is not None,
        "qemu.system_aarch64": _which("qemu-system-aarch64") is not None,
        "qemu.efi_firmware": Path("/usr/share/qemu-efi-aarch64/QEMU_EFI.fd").exists(),
        "kvm.available": Path("/dev/kvm").exists(),
        "host.arch": platform.machine(),
        "debootstrap.installed": _which("debootstrap") is not None,
        "ssh.client": _which("ssh") is not None,
        "mkfs.ext4": _which("mkfs.ext4") is not None,
        "mkfs.vfat": _which("mkfs.vfat") is not None,
        "ansible.runner": importlib.util.find_spec("ansible_runner") is not None,
        "ansible.playbook": _which("ansible-playbook") is not None,
    }


def probe_loop() -> Facts:
    facts: Facts = {"loop.control": Path("/dev/loop-control").exists()}
    losetup = _which("losetup")
    if not facts["loop.control"] or not losetup:
        facts["loop.free_device"] = ""
        return facts
    done = subprocess.run([losetup, "-f"], capture_output=True, text=True, timeout=10)
    facts["loop.free_device"] = done.stdout.strip() if done.returncode == 0 else ""
    return facts


def probe_opencl() -> Facts:
    facts: Facts = {"opencl.pyopencl": importlib.util.find_spec("pyopencl") is not None}
    if not facts["opencl.pyopencl"]:
        return facts
    import pyopencl as cl

    try:
        platforms = cl.get_platforms()
    except cl.Error as exc:  # PLATFORM_NOT_FOUND_KHR when no ICD is installed
        facts.update({"opencl.platforms": 0, "opencl.devices": [], "opencl.gpu_devices": 0,
                      "opencl.error": str(exc)})
        return facts
    devices = [(p, d) for p in platforms for d in p.get_devices()]
    facts.update({
        "opencl.platforms": len(platforms),
        "opencl.devices": [f"{p.name}: {d.name}" for p, d in devices],
        "opencl.gpu_devices": sum(1 for _, d in devices if d.type & cl.device_type.GPU),
        "opencl.error": "",
    })
    return facts


def probe_disk() -> Facts:
    target = state_dir()
    while not target.exists():
        target = target.parent
    usage = shutil.disk_usage(target)
    return {"disk.state_dir": str(state_dir()), "disk.free_gb": round(usage.free / 2**30, 1)}


def probe_capabilities() -> Facts:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            bounding = int(line.split()[1], 16)
            return {"caps.sys_resource": bool(bounding >> CAP_SYS_RESOURCE & 1)}
    return {}


PROBES: list[Callable[[], Facts]] = [probe_docker, probe_binfmt, probe_tools, probe_loop,
                                      probe_opencl, probe_disk, probe_capabilities]


def controller_facts() -> Facts:
    facts: Facts = {}
    for probe in PROBES:
        try:
            facts.update(probe())
        except Exception as exc:  # a probe that breaks is itself a finding, not a crash
            facts[f"probe.{probe.__name__}.error"] = f"{type(exc).__name__}: {exc}"
    return facts
