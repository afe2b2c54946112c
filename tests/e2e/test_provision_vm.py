"""Provisioning on a real arm64 kernel: the live half of every role, and that it survives a
reboot. The QEMU VM is the device here because a container cannot show a zram swap,
nr_hugepages or sysctl values of its own."""

from __future__ import annotations

import shutil

import pytest
import yaml

from provision import vm as vms
from provision.provisioning import provision

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which(vms.QEMU) is None,
                       reason=f"{vms.QEMU} is not installed (apt-get install qemu-system-arm)"),
]
KERNEL_TAGS = ["base", "zram", "hugepages", "cpu_governor", "tuning"]


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    image = vms.ensure_vm_image(progress=lambda _: None)
    machine = vms.start_vm(image, name="claw-vm-e2e-provision", progress=lambda _: None)
    try:
        inventory = tmp_path_factory.mktemp("vm") / "inventory.yml"
        vms.write_inventory(inventory)
        data = yaml.safe_load(inventory.read_text())
        group = data["all"]["children"]["qemu_vms"]
        group["hosts"] = {machine.name: group["hosts"][machine.name]}
        group["vars"]["claw_hugepages_mb"] = 64  # 32 pages of 2 MB
        inventory.write_text(yaml.safe_dump(data))
        yield machine, inventory
    finally:
        machine.stop()


@pytest.fixture(scope="module")
def provisioned(device):
    machine, inventory = device
    result, records = provision(inventory, tags=KERNEL_TAGS)
    return result, {r["host"]: r for r in records}[machine.name]


def sh(machine: vms.Vm, command: str) -> str:
    return machine.ssh(command, check=True).stdout.strip()


def assert_live_settings(machine: vms.Vm) -> None:
    """The kernel's own view, not the files that asked for it."""
    swaps = sh(machine, "cat /proc/swaps")
    assert "/dev/zram0" in swaps, swaps
    assert "[zstd]" in sh(machine, "cat /sys/block/zram0/comp_algorithm")
    mem_bytes = int(sh(machine, "awk '/MemTotal/ {print $2}' /proc/meminfo")) * 1024
    disksize = int(sh(machine, "cat /sys/block/zram0/disksize"))
    assert abs(disksize - mem_bytes * 0.5) <= 0.02 * mem_bytes, (disksize, mem_bytes)
    assert sh(machine, "cat /proc/sys/vm/nr_hugepages") == "32"
    assert sh(machine, "sysctl -n vm.swappiness") == "180"
    assert sh(machine, "sysctl -n vm.page-cluster") == "0"


def test_provisioning_applies_live_settings(device, provisioned):
    machine, _ = device
    result, record = provisioned
    assert result.rc == 0 and record["status"] == "ok", record
    assert_live_settings(machine)
    # No cpufreq in QEMU's virt machine: the governor is persistent only, and says so.
    assert any(note.startswith("cpu_governor") for note in record["skipped_live"]), record
    assert not any(note.startswith(("zram", "hugepages")) for note in record["skipped_live"])
    assert sh(machine, "systemctl is-enabled claw-cpu-governor.service") == "enabled"


def test_second_run_changes_nothing(device, provisioned):
    _, inventory = device
    result, records = provision(inventory, tags=KERNEL_TAGS)
    assert result.rc == 0 and [r["changed"] for r in records] == [0]


def test_settings_survive_a_reboot(device, provisioned):
    machine, _ = device
    machine.reboot()
    assert_live_settings(machine)
