"""The QEMU arm64 VM is a real arm64 Debian kernel, reached over SSH like a board; here it is
provisioned, and its settings must survive a reboot.

What a container cannot show, the VM must: zram as a kernel module, writable hugepages, a QEMU
machine without cpufreq, the live half of every role (a zram swap, nr_hugepages and sysctl
values of its own kernel), and a reboot that comes back on SSH with all of them applied.

One VM serves the whole file, in the order written: the bare machine first, then provisioning,
then the reboot. Each boot under QEMU TCG costs minutes beside the other tiers, so the file
boots once and reboots once.
"""

from __future__ import annotations

import shutil
import time

import pytest
import yaml

from provision import vm as vms
from provision.provisioning import provision

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(3600),  # a cold arm64 root under qemu-user: 10-20 min
    pytest.mark.skipif(shutil.which(vms.QEMU) is None,
                       reason=f"{vms.QEMU} is not installed (apt-get install qemu-system-arm)"),
]
KERNEL_TAGS = ["base", "zram", "hugepages", "cpu_governor", "tuning"]


@pytest.fixture(scope="module")
def vm():
    started = time.monotonic()
    image = vms.ensure_vm_image(progress=lambda m: print(f"vm image: {m}"))
    built = time.monotonic()
    machine = vms.start_vm(image, name="claw-vm-e2e", progress=lambda m: print(f"vm: {m}"))
    print(f"vm image {built - started:.1f} s, boot to SSH {time.monotonic() - built:.1f} s")
    try:
        yield machine
    finally:
        machine.stop()
    assert not machine.running()


@pytest.fixture(scope="module")
def inventory(vm, tmp_path_factory):
    """An inventory of this VM alone, asking for 32 hugepages of 2 MB."""
    path = tmp_path_factory.mktemp("vm") / "inventory.yml"
    vms.write_inventory(path)
    data = yaml.safe_load(path.read_text())
    group = data["all"]["children"]["qemu_vms"]
    group["hosts"] = {vm.name: group["hosts"][vm.name]}
    group["vars"]["claw_hugepages_mb"] = 64
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def provisioned(vm, inventory):
    result, records = provision(inventory, tags=KERNEL_TAGS)
    return result, {r["host"]: r for r in records}[vm.name]


def sh(vm: vms.Vm, cmd: str) -> str:
    return vm.ssh(cmd, check=True).stdout.strip()


# --- the bare machine ---------------------------------------------------------------------

def test_kernel_is_arm64(vm):
    assert sh(vm, "uname -m") == "aarch64"


def test_zram_is_a_loadable_module(vm):
    sh(vm, "modprobe zram")
    assert sh(vm, "test -d /sys/class/zram-control && echo yes") == "yes"
    assert "zram" in sh(vm, "cut -d' ' -f1 /proc/modules").split()


def test_hugepages_are_settable_live(vm):
    try:
        sh(vm, "echo 8 > /proc/sys/vm/nr_hugepages")
        assert sh(vm, "cat /proc/sys/vm/nr_hugepages") == "8"
    finally:
        sh(vm, "echo 0 > /proc/sys/vm/nr_hugepages")
    assert sh(vm, "cat /proc/sys/vm/nr_hugepages") == "0"


def test_machine_is_qemu(vm):
    assert sh(vm, "systemd-detect-virt") == "qemu"


def test_no_cpufreq(vm):
    assert vm.ssh("test -e /sys/devices/system/cpu/cpufreq/policy0").returncode == 1


def test_inventory_reaches_the_vm(vm):
    inventory = yaml.safe_load(vms.inventory_path().read_text())
    group = inventory["all"]["children"]["qemu_vms"]
    assert group["hosts"][vm.name]["ansible_port"] == vm.port
    assert group["vars"]["claw_profile"] == "qemu-virt"
    assert group["vars"]["ansible_host"] == "127.0.0.1"


# --- provisioned --------------------------------------------------------------------------

def assert_live_settings(vm: vms.Vm) -> None:
    """The kernel's own view, not the files that asked for it."""
    swaps = sh(vm, "cat /proc/swaps")
    assert "/dev/zram0" in swaps, swaps
    assert "[zstd]" in sh(vm, "cat /sys/block/zram0/comp_algorithm")
    mem_bytes = int(sh(vm, "awk '/MemTotal/ {print $2}' /proc/meminfo")) * 1024
    disksize = int(sh(vm, "cat /sys/block/zram0/disksize"))
    assert abs(disksize - mem_bytes * 0.5) <= 0.02 * mem_bytes, (disksize, mem_bytes)
    assert sh(vm, "cat /proc/sys/vm/nr_hugepages") == "32"
    assert sh(vm, "sysctl -n vm.swappiness") == "180"
    assert sh(vm, "sysctl -n vm.page-cluster") == "0"


def test_provisioning_applies_live_settings(vm, provisioned):
    result, record = provisioned
    assert result.rc == 0 and record["status"] == "ok", record
    assert_live_settings(vm)
    # No cpufreq in QEMU's virt machine: the governor is persistent only, and says so.
    assert any(note.startswith("cpu_governor") for note in record["skipped_live"]), record
    assert not any(note.startswith(("zram", "hugepages")) for note in record["skipped_live"])
    assert sh(vm, "systemctl is-enabled claw-cpu-governor.service") == "enabled"


def test_second_run_changes_nothing(inventory, provisioned):
    result, records = provision(inventory, tags=KERNEL_TAGS)
    assert result.rc == 0 and [r["changed"] for r in records] == [0]


def test_reboot_comes_back_with_the_settings_applied(vm, provisioned):
    before = vm.boot_id()
    started = time.monotonic()
    vm.reboot()
    print(f"reboot to SSH {time.monotonic() - started:.1f} s")
    assert vm.boot_id() not in (None, before)
    assert sh(vm, "systemctl is-system-running --wait || true") in ("running", "degraded")
    assert sh(vm, "hostname") == "claw-vm"
    assert_live_settings(vm)
