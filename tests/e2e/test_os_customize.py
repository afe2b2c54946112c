"""`claw os customize` on an image made another way: the QEMU VM's root filesystem (debootstrap
+ Debian's kernel, provision/vm.py) put into a GPT disk with a FAT partition holding the kernel,
as a vendor's image would come. The customised image is then booted and checked: hostname,
sudo user with the key, the roles' settings live, the root grown to the disk.

Run time: ~8-12 min on 2 shared cores (apt and the roles under qemu-user dominate; customize
has no cache, its input is the vendor's root), plus the VM image build when it is not cached.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from provision import vm as vms
from provision.osimage import disk
from tests.e2e.os_images import booted, claw_os, login_key, sh

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(3600),  # a cold arm64 root under qemu-user: 10-20 min
    pytest.mark.skipif(shutil.which(vms.QEMU) is None,
                       reason=f"{vms.QEMU} is not installed (apt-get install qemu-system-arm)"),
]
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
TAGS = "base,zram,hugepages,cpu_governor,tuning"  # no Docker/OpenCL: keeps apt short


def vendor_image(path: Path, vm_image: vms.VmImage) -> str:
    """GPT: FAT (kernel, initrd) + the VM's ext4 root copied in at its offset; its PARTUUID."""
    root_size = vm_image.rootfs.stat().st_size
    size = disk.MIB + 64 * disk.MIB + root_size + disk.MIB
    root_uuid = str(uuid.uuid4())
    with open(path, "wb") as out:
        out.truncate(size)
    table = (f"label: gpt\nstart=2048, size={64 * 2048}, type={disk.ESP_TYPE}\n"
             f"start={65 * 2048}, size={root_size // 512}, type={LINUX_TYPE}, uuid={root_uuid}\n")
    subprocess.run(["sfdisk", "-q", str(path)], input=table, text=True, check=True)
    boot = disk.Partition(1, disk.MIB, 64 * disk.MIB, disk.ESP_TYPE, "")
    disk.make_fat(path, boot, "VENDOR", {"vmlinuz": vm_image.kernel,
                                         "initrd.img": vm_image.initrd})
    subprocess.run(["dd", f"if={vm_image.rootfs}", f"of={path}", "bs=4M", "conv=sparse,notrunc",
                    f"seek={65 * disk.MIB}", "oflag=seek_bytes", "status=none"], check=True)
    return root_uuid


@pytest.fixture(scope="module")
def customised(tmp_path_factory):
    vm_image = vms.ensure_vm_image(progress=lambda _: None)
    out = tmp_path_factory.mktemp("custom")
    base = out / "vendor.img"
    root_uuid = vendor_image(base, vm_image)
    key = login_key(out)
    image = out / "custom.img"
    record = claw_os("customize", str(base), "-o", str(image), "--profile", "qemu-virt",
                     "--tags", TAGS, "--hostname", "claw-custom", "--user", "ops", "--ssh-key",
                     f"{key}.pub", "-e", "claw_hugepages_mb=64", "--compress", "zst")
    return image, key, root_uuid, vm_image, record


def test_customize_keeps_the_layout_and_writes_map_and_zst(customised):
    image, _, root_uuid, _, record = customised
    assert record["table"] == "gpt" and record["root_partition"] == 2
    assert record["root_label"] == "claw-root"  # the VM root's own label, kept
    layout = disk.read_layout(image)
    assert layout.root.uuid.lower() == root_uuid.lower()
    assert image.with_name(image.name + ".zst").is_file()
    assert json.loads(image.with_name(image.name + ".bmap").read_text())["image_size"] == \
        image.stat().st_size


def test_customised_image_boots_provisioned(customised):
    image, key, root_uuid, vm_image, _ = customised
    cmdline = f"root=PARTUUID={root_uuid} rw console=ttyAMA0 net.ifnames=0"
    with booted(vms.VmImage(vm_image.kernel, vm_image.initrd, image), "claw-os-e2e-custom",
                cmdline=cmdline, user="ops", key=key,
                disk_size=image.stat().st_size + (1 << 30)) as machine:
        assert sh(machine, "hostname") == "claw-custom"
        assert sh(machine, "sudo -n id -u") == "0"
        assert "/dev/zram0" in sh(machine, "cat /proc/swaps")
        assert sh(machine, "cat /proc/sys/vm/nr_hugepages") == "32"
        assert sh(machine, "systemctl is-enabled claw-cpu-governor.service") == "enabled"
        assert sh(machine, "systemctl is-active claw-grow-root.service") == "active"
        assert int(sh(machine, "findmnt -bno SIZE /")) > image.stat().st_size - (64 << 20)
