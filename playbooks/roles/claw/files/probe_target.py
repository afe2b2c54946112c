"""Report, as JSON, what the target's running kernel and init system can take *live*.

Run by the `claw` role on every target (read-only: it changes nothing). The provisioning
roles apply their persistent part everywhere and their live part only where this probe says
the feature is present and writable, so that nothing is attempted that would fail or that
would change a kernel which is not the device's own (a container shares its host's kernel).
Standard library only: the target may be a bare Debian root with nothing but python3.
"""

import glob
import json
import os
import subprocess


def read(path, default=""):
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read().strip()
    except OSError:
        return default


def read_only_mount(path):
    """True when the file system holding `path` is mounted read-only (or the path is absent)."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return True


def writable(path):
    return os.path.exists(path) and not read_only_mount(path) and os.access(path, os.W_OK)


def cpu_list(text):
    """Expand a kernel CPU list such as '0-3,6' into [0, 1, 2, 3, 6]."""
    cpus = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            low, high = part.split("-", 1)
            cpus.extend(range(int(low), int(high) + 1))
        else:
            cpus.append(int(part))
    return sorted(set(cpus))


def run(argv):
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return 127, ""
    return done.returncode, done.stdout.strip()


def container():
    """The container technology this root runs in, or '' on a machine with its own kernel."""
    code, out = run(["systemd-detect-virt", "--container"])
    if code == 0 and out and out != "none":
        return out
    hint = read("/run/systemd/container")
    if hint:
        return hint
    if os.path.exists("/.dockerenv"):
        return "docker"
    environ = read("/proc/1/environ").split("\0")
    for entry in environ:
        if entry.startswith("container="):
            return entry.split("=", 1)[1] or "container"
    return ""


def installed_packages():
    code, out = run(["dpkg-query", "-W", "-f", "${Package}\t${db:Status-Abbrev}\n"])
    if code != 0:
        return []
    names = []
    for line in out.splitlines():
        name, _, status = line.partition("\t")
        if status.startswith("ii"):
            names.append(name.split(":")[0])
    return sorted(set(names))


def has_apt_python():
    try:
        import apt_pkg  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        return False
    return True


def hugepage_default_kb():
    for line in read("/proc/meminfo").splitlines():
        if line.startswith("Hugepagesize:"):
            return int(line.split()[1])
    return 0


# What the roles may remove or create: every ClawForge file has "claw" in its name, plus the
# standard directories they write into. Knowing up front which exist lets a role skip a
# removal or a mkdir that has nothing to do (each would otherwise be a round trip per run).
PATH_GLOBS = (
    "/etc/systemd/system/*claw*", "/etc/systemd/system/*/*claw*", "/etc/systemd/system/*.d",
    "/etc/systemd/system/*.wants/*", "/etc/clawforge",
    "/etc/sysctl.d/*claw*", "/etc/tmpfiles.d/*claw*", "/etc/environment.d/*claw*",
    "/etc/udev/rules.d/*claw*", "/etc/OpenCL/vendors/*", "/usr/local/sbin/claw-*",
)
DIRS = ("/etc/docker", "/etc/sysctl.d", "/etc/tmpfiles.d", "/etc/udev/rules.d",
        "/etc/environment.d", "/etc/OpenCL/vendors", "/etc/ansible/facts.d")


def existing_paths():
    found = {path for pattern in PATH_GLOBS for path in glob.glob(pattern)}
    found.update(path for path in DIRS if os.path.isdir(path))
    return sorted(found)


def active_services():
    """Services systemd runs now (empty where systemd is not init): a role skips starting them."""
    code, out = run(["systemctl", "list-units", "--type=service", "--state=active",
                     "--no-legend", "--plain"])
    return sorted(line.split()[0] for line in out.splitlines() if line.strip()) if code == 0 else []


def main():
    policies = sorted(glob.glob("/sys/devices/system/cpu/cpufreq/policy[0-9]*"))
    governors = read(policies[0] + "/scaling_available_governors").split() if policies else []
    release = os.uname().release
    zram_module = os.path.isdir("/sys/module/zram") or os.path.exists(
        "/sys/class/zram-control") or run(["modprobe", "--dry-run", "--quiet", "zram"])[0] == 0
    controllers = read("/sys/fs/cgroup/cgroup.controllers").split()
    report = {
        "kernel": release,
        "systemd_running": os.path.isdir("/run/systemd/system"),
        "container": container(),
        "proc_sys_writable": writable("/proc/sys/vm/swappiness"),
        "sys_writable": not read_only_mount("/sys") and os.path.isdir("/sys/kernel"),
        "zram_module": zram_module,
        "zram_control": os.path.exists("/sys/class/zram-control"),
        "cpufreq_policies": [os.path.basename(p) for p in policies],
        "cpufreq_governors": governors,
        "cgroup_unified": os.path.exists("/sys/fs/cgroup/cgroup.controllers"),
        "cgroup_cpuset": "cpuset" in controllers,
        "irq_writable": writable("/proc/irq/default_smp_affinity"),
        "udev_running": os.path.exists("/run/udev/control"),
        "hugepage_default_kb": hugepage_default_kb(),
        "hugepage_sizes_kb": sorted(
            int(name[len("hugepages-"):-len("kB")])
            for name in (os.listdir("/sys/kernel/mm/hugepages")
                         if os.path.isdir("/sys/kernel/mm/hugepages") else [])
            if name.startswith("hugepages-") and name.endswith("kB")),
        "online_cpus": cpu_list(read("/sys/devices/system/cpu/online")),
        "apt_python": has_apt_python(),
        "packages": installed_packages(),
        "paths": existing_paths(),
        "active_services": active_services(),
    }
    print(json.dumps(report, sort_keys=True))


main()
