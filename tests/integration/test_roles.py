"""The provisioning roles (playbooks/site.yml) on an emulated device, checked on the device.

A device here is a Debian bookworm container with systemd as PID 1, reached over SSH on a
loopback port (host network: no Docker bridge exists or is made). Its kernel is the host's and
/proc/sys and /sys are read-only, so every role must take the "persistent only, say why" path:
the files and units are asserted inside the container, and the live steps must be reported as
skipped with the reason. A second run must change nothing; `--check` on a fresh device must
write nothing; bad variables must be refused by the roles' argument specs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration

PLAYBOOK = REPO / "playbooks" / "site.yml"
ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
MAIN, FRESH = 1, 2  # roletest-N listens on 2300+N
HOST_VARS = {  # what the controller would pass from a profile (generic-arm64) and overrides
    "claw_host": {"host": "roletest-1", "profile": "generic-arm64", "opencl_stack": "pocl"},
    "zram_fraction_of_ram": 0.5,
    "zram_max_mb": 4096,
    "zram_algorithm": "lz4",
    "zram_priority": 90,
    "hugepages_mb": 256,
    "hugepages_page_kb": 2048,
    "cpu_governor_name": "performance",
    "opencl_drivers_stack": "pocl",
    "docker_engine_bridge": "none",
    "tuning_inference_cpus": [1],
    "tuning_cpus": [0, 1],
}


def docker(*args: str, check: bool = True, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check,
                          timeout=timeout)


def sh(n: int, script: str, check: bool = True) -> str:
    """Run a shell script inside roletest-n; its stdout."""
    done = docker("exec", f"roletest-{n}", "sh", "-c", script, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"roletest-{n}: {script!r} failed ({done.returncode}): "
                             f"{done.stdout}{done.stderr}")
    return done.stdout


@dataclass
class Run:
    rc: int
    seconds: float
    stats: dict
    messages: list[str]
    output: str


class Devices:
    def __init__(self, workdir: Path, image: str):
        self.workdir = workdir
        self.image = image
        self.key = workdir / "key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)],
                       check=True, timeout=30)

    def start(self, n: int) -> None:
        port = 2300 + n
        conf = self.workdir / f"sshd-{port}.conf"
        conf.write_text(f"Port {port}\nListenAddress 127.0.0.1\n"
                        "PermitRootLogin prohibit-password\n")
        docker("rm", "-f", f"roletest-{n}", check=False)
        docker("run", "-d", "--name", f"roletest-{n}", "--network", "host",
               "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
               "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
               "--tmpfs", "/run", "--tmpfs", "/run/lock",
               "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw", "-e", "container=docker",
               "-v", f"{conf}:/etc/ssh/sshd_config.d/claw.conf:ro",
               "-v", f"{self.key}.pub:/root/.ssh/authorized_keys:ro",
               self.image, "/lib/systemd/systemd")

    def wait_for_ssh(self, n: int) -> None:
        deadline = time.monotonic() + 60
        while True:
            done = subprocess.run(
                ["ssh", "-i", str(self.key), "-p", str(2300 + n), "-o", "BatchMode=yes",
                 "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                 "-o", "ConnectTimeout=5", "root@127.0.0.1", "true"],
                capture_output=True, text=True, timeout=30)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"roletest-{n}: no SSH after 60 s: {done.stderr}")
            time.sleep(0.5)

    def inventory(self, n: int, **overrides) -> Path:
        host = {"ansible_host": "127.0.0.1", "ansible_port": 2300 + n, "ansible_user": "root",
                "ansible_ssh_private_key_file": str(self.key),
                "ansible_ssh_common_args": "-o StrictHostKeyChecking=no "
                                           "-o UserKnownHostsFile=/dev/null",
                **HOST_VARS, **overrides}
        path = self.workdir / f"inventory-{n}.json"
        path.write_text(json.dumps({"all": {"hosts": {f"roletest-{n}": host}}}))
        return path

    def play(self, n: int, *args: str, **overrides) -> Run:
        """ansible-playbook site.yml against roletest-n, read as a user reads it."""
        env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "playbooks" / "ansible.cfg"),
               "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
               "ANSIBLE_LOCAL_TEMP": str(self.workdir / "ansible-tmp")}
        started = time.monotonic()
        done = subprocess.run([str(ANSIBLE_PLAYBOOK), "-i", str(self.inventory(n, **overrides)),
                               str(PLAYBOOK), *args],
                              capture_output=True, text=True, env=env, timeout=600)
        seconds = time.monotonic() - started
        recap = re.search(rf"^roletest-{n}\s*:\s*(.*)$", done.stdout, re.MULTILINE)
        stats = {key: int(value) for key, value in
                 re.findall(r"(\w+)=(\d+)", recap.group(1))} if recap else {}
        messages = [json.loads(quoted) for quoted in
                    re.findall(r'^\s*"msg": (".*")$', done.stdout, re.MULTILINE)]
        return Run(done.returncode, seconds, stats, messages, done.stdout + done.stderr)


def bridges() -> set[str]:
    """Bridge interfaces in this (the host's) network namespace, which the devices share."""
    done = subprocess.run(["ip", "-o", "link", "show", "type", "bridge"], capture_output=True,
                          text=True, timeout=30)
    return {line.split(":")[1].strip() for line in done.stdout.splitlines() if ":" in line}


def state_digest(n: int) -> str:
    """What a run could change: /etc, /usr and dpkg's database (names, sizes, times)."""
    listing = sh(n, "find /etc /usr /var/lib/dpkg -xdev -not -path '*/__pycache__/*' "
                    "-printf '%p %s %T@ %m\\n' | sort")
    return hashlib.sha256(listing.encode()).hexdigest()


@pytest.fixture(scope="module")
def devices(tmp_path_factory):
    if shutil.which("docker") is None or docker("info", check=False).returncode != 0:
        pytest.skip("no Docker engine (start one: dockerd --iptables=false --ip6tables=false "
                    "--bridge=none)")
    if not ANSIBLE_PLAYBOOK.exists():
        pytest.skip("ansible-playbook is not installed (pip install 'clawforge[controller]')")
    from provision.devices import ensure_base_image

    # The same base the emulated devices use, made (or found in its cache) here: a fresh
    # machine has none, and a skip would hide every test below.
    made = Devices(tmp_path_factory.mktemp("roletest"),
                   ensure_base_image("amd64", progress=lambda _: None))
    try:
        for n in (MAIN, FRESH):
            made.start(n)
        for n in (MAIN, FRESH):
            made.wait_for_ssh(n)
        yield made
    finally:
        for n in (MAIN, FRESH):
            docker("rm", "-f", f"roletest-{n}", check=False)


@pytest.fixture(scope="module")
def first_run(devices):
    bridges_before = bridges()
    run = devices.play(MAIN)
    assert run.rc == 0 and run.stats.get("failed", 1) == 0, run.output[-6000:]
    print(f"\nfirst run: {run.seconds:.1f} s, {run.stats}")
    run.bridges_before = bridges_before
    return run


def test_zram_generator_config_has_the_size_and_algorithm(devices, first_run):
    memtotal_mb = int(sh(MAIN, "awk '/^MemTotal:/ {print $2}' /proc/meminfo")) // 1024
    size = min(int(memtotal_mb * HOST_VARS["zram_fraction_of_ram"]), HOST_VARS["zram_max_mb"])
    conf = sh(MAIN, "cat /etc/systemd/zram-generator.conf").splitlines()
    assert "[zram0]" in conf
    assert f"zram-size = {size}" in conf
    assert "compression-algorithm = lz4" in conf
    assert "swap-priority = 90" in conf
    assert "ii" in sh(MAIN, "dpkg -l systemd-zram-generator | tail -1")


def test_sysctl_files_hold_hugepages_and_tuning(devices, first_run):
    hugepages = sh(MAIN, "cat /etc/sysctl.d/60-claw-hugepages.conf").splitlines()
    assert "vm.nr_hugepages = 128" in hugepages  # 256 MiB in 2048 KiB pages
    tuning = sh(MAIN, "cat /etc/sysctl.d/70-claw-tuning.conf").splitlines()
    for line in ("vm.swappiness = 180", "vm.page-cluster = 0", "vm.dirty_background_ratio = 5",
                 "vm.dirty_ratio = 10"):
        assert line in tuning
    # systemd-sysctl reads them back as it would at boot (without applying: --cat-config)
    merged = sh(MAIN, "/lib/systemd/systemd-sysctl --cat-config")
    assert "vm.nr_hugepages = 128" in merged and "vm.swappiness = 180" in merged
    rules = sh(MAIN, "cat /etc/udev/rules.d/60-claw-iosched.rules")
    assert 'KERNEL=="mmcblk[0-9]*", ATTR{queue/scheduler}="mq-deadline"' in rules


def test_governor_and_irq_units_are_installed_and_enabled(devices, first_run):
    unit = sh(MAIN, "cat /etc/systemd/system/claw-cpu-governor.service")
    assert "ExecStart=/usr/local/sbin/claw-cpu-governor performance" in unit
    enabled = sh(MAIN, "systemctl is-enabled claw-cpu-governor.service "
                       "claw-irq-affinity.service").split()
    assert enabled == ["enabled", "enabled"]
    # No cpufreq here: systemd skips the unit on its condition rather than failing it.
    sh(MAIN, "systemctl start claw-cpu-governor.service")
    assert sh(MAIN, "systemctl show -p ConditionResult --value claw-cpu-governor").strip() == "no"
    irq = sh(MAIN, "cat /etc/systemd/system/claw-irq-affinity.service")
    assert "ExecStart=/usr/local/sbin/claw-irq-affinity 0" in irq
    dropin = sh(MAIN, "cat /etc/systemd/system/system.slice.d/50-claw-cpus.conf")
    assert "AllowedCPUs=0" in dropin.splitlines()
    assert "AllowedCPUs=1" in sh(MAIN, "cat /etc/systemd/system/claw-inference.slice")


def test_opencl_icd_and_clinfo_show_pocl(devices, first_run):
    icd = sh(MAIN, "cat /etc/OpenCL/vendors/pocl.icd")
    assert "libpocl" in icd
    platforms = sh(MAIN, "clinfo -l")
    assert "Portable Computing Language" in platforms and "Device #0" in platforms
    assert any(m.startswith("opencl_drivers: pocl: platform \"Portable Computing Language\"")
               for m in first_run.messages), first_run.messages


def test_docker_runs_without_a_bridge(devices, first_run):
    assert sh(MAIN, "systemctl is-active docker").strip() == "active"
    assert sh(MAIN, "systemctl is-enabled docker").strip() == "enabled"
    daemon = json.loads(sh(MAIN, "cat /etc/docker/daemon.json"))
    assert daemon["bridge"] == "none" and daemon["iptables"] is False
    assert daemon["ip6tables"] is False
    assert daemon["log-opts"] == {"max-size": "10m", "max-file": "3"}
    networks = sh(MAIN, "docker network ls --format '{{.Name}}'").split()
    assert "bridge" not in networks and "host" in networks
    assert bridges() <= first_run.bridges_before  # nothing new in the shared namespace


def test_base_writes_host_json_and_local_fact(devices, first_run):
    assert json.loads(sh(MAIN, "cat /etc/clawforge/host.json")) == HOST_VARS["claw_host"]
    fact = json.loads(sh(MAIN, "cat /etc/ansible/facts.d/clawforge.fact"))
    assert fact["host"] == HOST_VARS["claw_host"]
    assert "ii" in sh(MAIN, "dpkg -l python3-apt | tail -1")


def test_live_steps_are_reported_skipped_with_the_reason(devices, first_run):
    skipped = [m for m in first_run.messages if " skipped: " in m]
    by_role = {m.split(":", 1)[0] for m in skipped}
    assert {"zram", "hugepages", "cpu_governor", "tuning"} <= by_role, skipped
    zram = next(m for m in skipped if m.startswith("zram:"))
    assert "docker container" in zram and "/etc/systemd/zram-generator.conf installed" in zram
    assert any(m.startswith("tuning: loading vm.") and "sysctl.d/70-claw-tuning.conf" in m
               for m in skipped)
    assert any("cgroup v1" in m for m in skipped)  # AllowedCPUs= needs cgroup v2
    # Services are still started live in a container: docker is not among the skipped.
    assert "docker_engine" not in by_role and "opencl_drivers" not in by_role


def test_second_run_changes_nothing(devices, first_run):
    run = devices.play(MAIN)
    print(f"\nsecond run: {run.seconds:.1f} s (first {first_run.seconds:.1f} s), {run.stats}")
    assert run.rc == 0, run.output[-6000:]
    assert run.stats["changed"] == 0 and run.stats["failed"] == 0, run.stats


def test_check_mode_on_a_fresh_device_writes_nothing(devices, first_run):
    before = state_digest(FRESH)
    run = devices.play(FRESH, "--check", "--diff")
    assert run.rc == 0, run.output[-6000:]
    assert run.stats["changed"] > 0  # it does say what it would do
    assert state_digest(FRESH) == before
    assert sh(FRESH, "test -e /etc/systemd/zram-generator.conf || echo absent").strip() == "absent"
    assert any("would install: docker.io" in m for m in run.messages), run.messages


@pytest.mark.parametrize(("variable", "value", "role", "said"), [
    ("zram_algorithm", "gzip", "zram", "must be one of: lz4, zstd, lzo-rle, lzo, got: gzip"),
    ("hugepages_mb", "lots", "hugepages", "unable to convert to int"),
    ("opencl_drivers_stack", "cuda", "opencl_drivers", "got: cuda"),
    ("tuning_inference_cpus", ["x"], "tuning", "unable to convert to int"),
    ("docker_engine_log_max_files", "many", "docker_engine", "unable to convert to int"),
])
def test_bad_variables_are_refused_by_argument_specs(devices, first_run, variable, value, role,
                                                     said):
    run = devices.play(MAIN, "--check", "--tags", role, "-e", json.dumps({variable: value}))
    assert run.rc != 0
    assert f"TASK [{role} : Validating arguments against arg spec 'main'" in run.output
    failed = run.output[run.output.index(f"TASK [{role} : Validating"):]
    assert variable in failed and said in failed, failed[:2000]


def test_a_range_outside_the_spec_is_refused_with_the_variable_named(devices, first_run):
    run = devices.play(MAIN, "--check", "--tags", "zram", "-e", "zram_fraction_of_ram=2.0")
    assert run.rc != 0
    assert "zram: zram_fraction_of_ram is 2.0 (expected a number greater than 0" in run.output


def test_ansible_lint_production_profile():
    pytest.importorskip("ansiblelint", reason="ansible-lint is not installed "
                                               "(pip install ansible-lint)")
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(REPO / "playbooks" / "roles"),
           "NO_COLOR": "1"}
    done = subprocess.run([sys.executable, "-m", "ansiblelint", "--profile", "production",
                           "playbooks/"], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in done.stdout + done.stderr


def test_backports_install_and_what_bookworm_backports_lacks(devices):
    """opencl_drivers_backports on bookworm: bookworm-backports added to apt's sources and
    mesa-opencl-icd taken from it (Mesa 25 replacing bookworm's 22.3); that build has no
    rusticl (clover's mesa.icd only), so the role stops saying the rusticl ICD is missing and
    where the package came from. Runs last: it changes what other tests check here."""
    run = devices.play(MAIN, "--tags", "opencl_drivers", "-e", json.dumps({
        "opencl_drivers_stack": "rusticl", "opencl_drivers_icd": "rusticl.icd",
        "opencl_drivers_backports": True, "opencl_drivers_env": {"RUSTICL_ENABLE": "llvmpipe"}}))
    print(f"\nmesa-opencl-icd from bookworm-backports: {run.seconds:.1f} s")
    assert run.rc != 0 and run.stats.get("failed") == 1, run.output[-6000:]
    assert ("/etc/OpenCL/vendors/rusticl.icd is missing after installing mesa-opencl-icd"
            in run.output), run.output[-4000:]
    assert "(mesa-opencl-icd from bookworm-backports, whose build may lack it)" in run.output
    assert "bookworm-backports main" in sh(MAIN, "cat /etc/apt/sources.list.d/claw-backports.list")
    version = sh(MAIN, "dpkg-query -W -f '${Version}' mesa-opencl-icd")
    assert "bpo12" in version and int(version.split(".")[0]) >= 25, version
    assert "mesa.icd" in sh(MAIN, "ls /etc/OpenCL/vendors")
