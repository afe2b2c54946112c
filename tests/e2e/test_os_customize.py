"""`claw os customize` on an image made another way: the QEMU VM's root filesystem (debootstrap
+ Debian's kernel, provision/vm.py) put into a GPT disk with a FAT partition holding the kernel,
as a vendor's image would come, with what a vendor root has and debugfs rdump alone loses (a
file capability, a hard-linked pair, a device node, a FIFO) written into it by debugfs. The
customised image is then booted and checked: hostname, sudo user with the key, the roles'
settings live, the root partition grown to --size by customize (and the filesystem to the VM's
bigger disk on first boot), the capability honoured for the user, the links and
special files there.

Run time: ~3-12 min on 2 shared cores (apt and the roles under qemu-user dominate; customize
has no cache, its input is the vendor's root), plus the VM image build when it is not cached.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from provision import vm as vms
from provision.osimage import disk
from tests.e2e.os_images import booted, claw_os, debugfs, login_key, sh

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(3600),  # a cold arm64 root under qemu-user: 10-20 min
    pytest.mark.skipif(shutil.which(vms.QEMU) is None,
                       reason=f"{vms.QEMU} is not installed (apt-get install qemu-system-arm)"),
]
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
TAGS = "base,zram,hugepages,cpu_governor,tuning"  # no Docker/OpenCL: keeps apt short
CAP_NET_RAW = bytes.fromhex("0100000200200000" + "00" * 12)  # setcap cap_net_raw+ep
PROBE = "/var/lib/claw-probe"
GROWN_MB = 512  # --size: the image this much bigger than the vendor's, the root grown into it


def add_probes(path: Path, root: disk.Partition) -> None:
    """A copy of dash with cap_net_raw+ep, a file with two names (one inode, links_count 2),
    /dev/null's twin and a FIFO, written into the vendor root with debugfs -w (no mount)."""
    source = disk.at(path, root)
    dash, cap, small = (path.with_name(n) for n in ("dash", "cap.bin", "small"))
    subprocess.run(["debugfs", "-R", f"dump /usr/bin/dash {dash}", source], check=True,
                   capture_output=True)
    cap.write_bytes(CAP_NET_RAW)
    small.write_text("one inode\n")
    script = path.with_name("probes.debugfs")
    script.write_text(f"""write {dash} /usr/local/bin/claw-capsh
sif /usr/local/bin/claw-capsh mode 0100755
ea_set -f {cap} /usr/local/bin/claw-capsh security.capability
mkdir {PROBE}
write {small} {PROBE}/a
ln {PROBE}/a {PROBE}/b
sif {PROBE}/a links_count 2
cd {PROBE}
mknod null c 1 3
sif null mode 020666
mknod fifo p
sif fifo mode 010600
""")
    subprocess.run(["debugfs", "-w", "-f", str(script), source], check=True, capture_output=True)
    assert subprocess.run(["e2fsck", "-fn", source], capture_output=True).returncode == 0


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
    add_probes(path, disk.Partition(2, 65 * disk.MIB, root_size, LINUX_TYPE, root_uuid))
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
                     f"{key}.pub", "-e", "claw_hugepages_mb=64", "--compress", "zst",
                     "--size", f"{base.stat().st_size // disk.MIB + GROWN_MB}M")
    return image, key, root_uuid, vm_image, record


def test_customize_keeps_the_layout_and_writes_map_and_zst(customised):
    image, _, root_uuid, _, record = customised
    assert record["table"] == "gpt" and record["root_partition"] == 2
    assert record["root_label"] == "claw-root"  # the VM root's own label, kept
    layout = disk.read_layout(image)
    assert layout.root.uuid.lower() == root_uuid.lower()
    assert record["size"] == image.stat().st_size == layout.size
    assert layout.root.end == layout.size - disk.MIB  # grown to the end, GPT's backup after it
    stats = debugfs(image, layout, "stats").decode()
    blocks = int(re.search(r"^Block count:\s+(\d+)", stats, re.M)[1])
    assert blocks * int(re.search(r"^Block size:\s+(\d+)", stats, re.M)[1]) == layout.root.size
    assert image.with_name(image.name + ".zst").is_file()
    assert json.loads(image.with_name(image.name + ".bmap").read_text())["image_size"] == \
        image.stat().st_size
    copied = record["root_copy"]
    print(f"root copy: {copied}, steps {record['steps']}")
    assert copied["xattrs"] >= 1 and copied["hard_links"] >= 1 and copied["special_files"] >= 2


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
        # what debugfs rdump alone loses, kept: the capability works for the user (its
        # shell's own effective set, bit 13 = cap_net_raw), the links, the special files
        script = "while read k v; do case $k in CapEff:) echo $v;; esac; done < /proc/self/status"
        assert int(sh(machine, f"/usr/local/bin/claw-capsh -c '{script}'"), 16) & (1 << 13)
        assert int(sh(machine, "grep CapEff /proc/self/status").split()[1], 16) == 0
        getxattr = ("python3 -c 'import os; print(os.getxattr(\"/usr/local/bin/claw-capsh\", "
                    "\"security.capability\").hex())'")
        assert sh(machine, getxattr) == CAP_NET_RAW.hex()
        links = sh(machine, f"stat -c '%i %h' {PROBE}/a {PROBE}/b").splitlines()
        assert links[0] == links[1] and links[0].endswith(" 2")
        assert sh(machine, f"stat -c '%F %t:%T %a' {PROBE}/null") == \
            "character special file 1:3 666"
        assert sh(machine, f"stat -c '%F %a' {PROBE}/fifo") == "fifo 600"
