"""The QEMU arm64 VM is a real arm64 Debian kernel, reached over SSH like a board.

What a container cannot show, the VM must: zram as a kernel module, writable hugepages, a
QEMU machine without cpufreq, and a reboot that comes back on SSH.
"""

from __future__ import annotations

import shutil
import time

import pytest

from provision import vm as vms

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(3600),  # a cold arm64 root under qemu-user: 10-20 min
    pytest.mark.skipif(shutil.which(vms.QEMU) is None,
                       reason=f"{vms.QEMU} is not installed (apt-get install qemu-system-arm)"),
]


@pytest.fixture(scope="module")
def vm():
    started = time.monotonic()
    image = vms.ensure_vm_image(progress=lambda m: print(f"vm image: {m}"))
    built = time.monotonic()
    machine = vms.start_vm(image, progress=lambda m: print(f"vm: {m}"))
    print(f"vm image {built - started:.1f} s, boot to SSH {time.monotonic() - built:.1f} s")
    try:
        yield machine
    finally:
        machine.stop()
    assert not machine.running()


def sh(vm: vms.Vm, cmd: str) -> str:
    return vm.ssh(cmd, check=True).stdout.strip()


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
    import yaml

    inventory = yaml.safe_load(vms.inventory_path().read_text())
    group = inventory["all"]["children"]["qemu_vms"]
    assert group["hosts"][vm.name]["ansible_port"] == vm.port
    assert group["vars"]["claw_profile"] == "qemu-virt"
    assert group["vars"]["ansible_host"] == "127.0.0.1"


def test_reboot_comes_back(vm):
    before = vm.boot_id()
    started = time.monotonic()
    vm.reboot()
    print(f"reboot to SSH {time.monotonic() - started:.1f} s")
    assert vm.boot_id() not in (None, before)
    assert sh(vm, "systemctl is-system-running --wait || true") in ("running", "degraded")
    assert sh(vm, "hostname") == "claw-vm"
