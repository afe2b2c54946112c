#!/usr/bin/env python3
"""Print what `claw doctor` needs to know about this device, as one JSON object.

Runs on the device through Ansible's `script` module, with only Python's standard library
(devices carry no ClawForge dependencies). Keys match the facts named in the doctor's
knowledge base; a fact that cannot be read is left out, never guessed.
"""

import glob
import json
import os
import platform
import shutil
import subprocess


def read(path, default=None):
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return default


def run(*argv):
    if not shutil.which(argv[0]):
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def zram(facts):
    release = platform.release()
    loaded = os.path.isdir("/sys/module/zram")
    on_disk = bool(glob.glob(f"/lib/modules/{release}/kernel/drivers/block/zram/zram.ko*"))
    builtin = "zram" in (read(f"/lib/modules/{release}/modules.builtin", "") or "")
    facts["zram.available"] = loaded or on_disk or builtin
    swaps = read("/proc/swaps", "") or ""
    facts["zram.swap_active"] = "/dev/zram" in swaps


def memory(facts):
    meminfo = {}
    for line in (read("/proc/meminfo", "") or "").splitlines():
        key, _, rest = line.partition(":")
        meminfo[key] = int(rest.split()[0]) if rest.split() else 0
    if "MemTotal" in meminfo:
        facts["memory.total_gb"] = round(meminfo["MemTotal"] / 2**20, 2)
    nr = read("/proc/sys/vm/nr_hugepages")
    if nr is not None:
        facts["hugepages.nr"] = int(nr)
    wanted = 0
    for conf in sorted(glob.glob("/etc/sysctl.d/*.conf")):
        for line in (read(conf, "") or "").splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "vm.nr_hugepages" and value.strip().isdigit():
                wanted = int(value.strip())
    facts["hugepages.configured"] = wanted
    v2 = read("/sys/fs/cgroup/cgroup.controllers")
    facts["cgroup.memory"] = ("memory" in v2.split()) if v2 is not None else \
        os.path.isdir("/sys/fs/cgroup/memory")


def cpufreq(facts):
    policies = sorted(glob.glob("/sys/devices/system/cpu/cpufreq/policy*"))
    facts["cpufreq.present"] = bool(policies)
    facts["cpufreq.governors"] = sorted({read(f"{p}/scaling_governor", "?") for p in policies})
    capped = [p for p in policies
              if (read(f"{p}/scaling_max_freq") or "0").isdigit()
              and (read(f"{p}/cpuinfo_max_freq") or "0").isdigit()
              and int(read(f"{p}/scaling_max_freq", "0")) < int(read(f"{p}/cpuinfo_max_freq", "0"))]
    facts["cpufreq.capped_policies"] = len(capped)


def thermal(facts):
    temps = []
    for zone in glob.glob("/sys/class/thermal/thermal_zone*/temp"):
        value = read(zone)
        if value and value.lstrip("-").isdigit():
            temps.append(int(value) / 1000)
    facts["thermal.zones"] = len(temps)
    facts["thermal.max_c"] = max(temps) if temps else None


def opencl(facts):
    icds = sorted(glob.glob("/etc/OpenCL/vendors/*.icd"))
    facts["opencl.icd_files"] = [os.path.basename(p) for p in icds]
    facts["opencl.icd_libraries"] = [read(p, "") for p in icds]
    facts["opencl.mali_blob"] = any("mali" in (read(p, "") or "").lower() for p in icds)
    for module in ("panthor", "panfrost", "mali_kbase", "nvgpu"):
        facts[f"kernel.module.{module}"] = os.path.isdir(f"/sys/module/{module}")


def services(facts):
    state = run("systemctl", "is-active", "docker")
    facts["docker.installed"] = shutil.which("dockerd") is not None
    facts["docker.active"] = state == "active" if state is not None else \
        os.path.exists("/var/run/docker.sock")
    synced = run("timedatectl", "show", "-p", "NTPSynchronized", "--value")
    if synced in ("yes", "no"):
        facts["time.synchronized"] = synced == "yes"
    virt = run("systemd-detect-virt")
    facts["virt.kind"] = virt or ("container" if os.path.exists("/.dockerenv") else "none")


def main():
    facts = {"kernel.release": platform.release(), "kernel.arch": platform.machine()}
    for step in (zram, memory, cpufreq, thermal, opencl, services):
        try:
            step(facts)
        except Exception as exc:  # one unreadable area must not hide the rest
            facts[f"probe.{step.__name__}.error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(facts))


if __name__ == "__main__":
    main()
