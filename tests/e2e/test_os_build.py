"""`claw os build qemu-virt` end to end: build the image through the real CLI, boot it in
qemu-system-aarch64 (TCG) from its own boot partition, log in with the configured key and
check what the image promised: hostname, sudo user, the roles' persistent settings live on
the booted kernel, the preloaded image in Docker, the root grown to the (bigger) disk.

Run time: a cold build is ~20-30 min on 2 shared cores (debootstrap and apt under qemu-user,
then the roles); with the roots cached (keyed by their inputs) the build takes ~1-2 min and
the boot and checks ~3 min.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time

import pytest

from provision import vm as vms
from provision.osimage.build import extract_boot_files
from tests.e2e.os_images import booted as booted_vm
from tests.e2e.os_images import claw_os, login_key, sh

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(3600),  # a cold arm64 root under qemu-user: 10-20 min
    pytest.mark.skipif(shutil.which(vms.QEMU) is None,
                       reason=f"{vms.QEMU} is not installed (apt-get install qemu-system-arm)"),
]
TAG = "claw-s5os-preload:tiny"
HOSTNAME, USER = "claw-e2e-os", "clawops"
IMAGE_SIZE, DISK_SIZE = 3 << 30, 5 << 30


def docker_ok() -> bool:
    return shutil.which("docker") is not None and subprocess.run(
        ["docker", "info"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def preload_tag(tmp_path_factory):
    """A tiny image of our own (nothing can be pulled here): one file, imported."""
    if not docker_ok():
        pytest.skip("no Docker engine (scripts/setup.sh starts one)")
    src = tmp_path_factory.mktemp("preload")
    (src / "hello.txt").write_text("preloaded by claw os build\n")
    tar = subprocess.run(["tar", "-C", str(src), "-c", "."], capture_output=True, check=True)
    subprocess.run(["docker", "import", "-", TAG], input=tar.stdout, capture_output=True,
                   check=True)
    yield TAG
    subprocess.run(["docker", "rmi", "-f", TAG], capture_output=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory, preload_tag):
    out = tmp_path_factory.mktemp("os")
    key = login_key(out)
    image = out / "qemu-virt.img"
    record = claw_os("build", "qemu-virt", "-o", str(image), "--size", "3G", "--hostname",
                     HOSTNAME, "--user", USER, "--ssh-key", f"{key}.pub", "--wifi",
                     "claw-lab:correct horse battery", "--preload-image", preload_tag,
                     "-e", "claw_hugepages_mb=64")
    return image, key, record


@pytest.fixture(scope="module")
def booted(built, tmp_path_factory):
    image, key, _ = built
    boot = extract_boot_files(image, tmp_path_factory.mktemp("boot"))
    cmdline = boot["cmdline.txt"].read_text().strip()
    with booted_vm(vms.VmImage(boot["vmlinuz"], boot["initrd.img"], image), "claw-os-e2e",
                   cmdline=cmdline, user=USER, key=key, disk_size=DISK_SIZE) as vm:
        yield vm


def test_outputs_are_sparse_mapped_and_hashed(built):
    image, _, record = built
    assert set(record['steps']) and record['files'][0] == str(image)
    assert image.stat().st_size == IMAGE_SIZE
    assert image.stat().st_blocks * 512 < IMAGE_SIZE  # written sparse
    bmap = json.loads(image.with_name(image.name + ".bmap").read_text())
    digest = hashlib.sha256()
    with open(image, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    assert bmap["image_sha256"] == digest.hexdigest()
    assert image.with_name(image.name + ".sha256").read_text().split()[0] == digest.hexdigest()
    assert 0 < bmap["mapped_bytes"] < IMAGE_SIZE
    assert not list(image.parent.glob(".*build-*"))  # the work directory is gone


def test_boots_with_hostname_user_and_key(booted):
    assert sh(booted, "hostname") == HOSTNAME
    assert sh(booted, "id -un") == USER
    assert "sudo" in sh(booted, "id -nG").split()
    assert sh(booted, "sudo -n id -u") == "0"  # sudo without a password
    # Host keys are made on the device, not shipped in the image.
    assert sh(booted, "systemctl is-active claw-ssh-hostkeys.service") == "active"
    assert sh(booted, "sudo -n ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub").endswith(
        "(ED25519)")


def test_provisioning_is_live_after_boot(booted):
    swaps = sh(booted, "cat /proc/swaps")
    assert "/dev/zram0" in swaps, swaps
    assert "[zstd]" in sh(booted, "cat /sys/block/zram0/comp_algorithm")
    assert sh(booted, "cat /proc/sys/vm/nr_hugepages") == "32"  # 64 MB of 2 MB pages
    assert sh(booted, "cat /proc/sys/vm/swappiness") == "180"  # the tuning role's sysctl
    assert sh(booted, "systemctl is-enabled claw-cpu-governor.service") == "enabled"


def test_network_and_wifi_config(booted):
    assert sh(booted, "systemctl is-active systemd-networkd") == "active"
    wants = "/etc/systemd/system/sys-subsystem-net-devices-wlan0.device.wants"
    assert sh(booted, f"readlink {wants}/wpa_supplicant@wlan0.service").endswith(
        "wpa_supplicant@.service")  # started when wlan0 appears; this VM has none
    conf = sh(booted, "sudo -n cat /etc/wpa_supplicant/wpa_supplicant-wlan0.conf")
    assert "correct horse" not in conf and "psk=" in conf  # the derived key, not the phrase


def test_root_grew_to_the_disk(booted):
    assert sh(booted, "systemctl is-active claw-grow-root.service") == "active"
    size = int(sh(booted, "findmnt -bno SIZE /"))
    assert size > 4.5 * 2**30, size  # the 3 GiB image on a 5 GiB disk
    assert sh(booted, "test -e /etc/clawforge/grow-root || echo gone") == "gone"


def test_preloaded_image_is_in_docker(booted, preload_tag):
    deadline = time.monotonic() + 300  # dockerd under TCG starts slowly
    state = ""
    while time.monotonic() < deadline:
        state = booted.ssh("systemctl is-active claw-preload-images.service").stdout.strip()
        if state in ("active", "failed"):
            break
        time.sleep(5)
    assert state == "active", booted.ssh(
        "sudo -n journalctl -u claw-preload-images -u docker --no-pager | tail -20").stdout
    assert preload_tag in sh(booted, "sudo -n docker images --format '{{.Repository}}:{{.Tag}}'")
