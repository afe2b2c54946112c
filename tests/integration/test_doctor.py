"""`claw doctor` reports true findings: break one real thing and the matching fault appears."""

from __future__ import annotations

import json
import os
import socket
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO, claw_subprocess

pytestmark = pytest.mark.integration


def findings(result, host="controller"):
    return {f["id"]: f for f in json.loads(result.out) if f["host"] == host}


def test_healthy_controller_passes():
    result = claw_subprocess("doctor", "--json")
    got = findings(result)
    assert result.code == 0, [f for f in got.values() if f["status"] == "fault"]
    assert got["docker-engine-unreachable"]["status"] == "ok"
    assert got["binfmt-aarch64-not-registered"]["status"] == "ok"
    assert got["opencl-no-platform"]["status"] == "ok"  # PoCL from the test extra
    assert all(f["status"] != "n/a" for f in got.values())


def test_stopped_engine_is_reported(tmp_path):
    """A socket left behind by a stopped dockerd: connecting is refused."""
    stale = tmp_path / "docker.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(stale))
    sock.close()  # bound, never listening: exactly what a dead engine leaves
    result = claw_subprocess("doctor", "--json", env={"DOCKER_HOST": f"unix://{stale}"})
    assert result.code == 1
    fault = findings(result)["docker-engine-unreachable"]
    assert fault["status"] == "fault" and fault["severity"] == "error"
    assert str(stale) in fault["detail"]
    table = claw_subprocess("doctor", env={"DOCKER_HOST": f"unix://{stale}"})
    assert table.code == 1 and "docker-engine-unreachable" in table.out
    assert "Traceback" not in table.err


def test_missing_opencl_driver_is_reported(tmp_path):
    no_vendors = str(tmp_path / "no-vendors")  # the ICD loader finds no driver at all
    result = claw_subprocess("doctor", "--json", env={"OCL_ICD_VENDORS": no_vendors})
    fault = findings(result)["opencl-no-platform"]
    assert fault["status"] == "fault" and "PLATFORM_NOT_FOUND" in fault["detail"]


def test_device_checks_over_ansible_match_this_machine():
    """This machine as the device (local connection): facts must equal what /sys shows."""
    result = claw_subprocess("doctor", "-i", str(REPO / "examples" / "local.yml"), "--json")
    got = findings(result, "localhost")
    assert got["device-unreachable"]["status"] == "ok"
    release = os.uname().release
    has_zram = Path("/sys/module/zram").is_dir() or any(
        Path(f"/lib/modules/{release}/kernel/drivers/block/zram").glob("zram.ko*"))
    assert got["zram-module-absent"]["status"] == ("ok" if has_zram else "fault")
    has_cpufreq = any(Path("/sys/devices/system/cpu/cpufreq").glob("policy*"))
    assert got["cpufreq-absent"]["status"] == ("ok" if has_cpufreq else "fault")
    has_icd = any(Path("/etc/OpenCL/vendors").glob("*.icd"))
    assert got["opencl-icd-missing"]["status"] == ("ok" if has_icd else "fault")


def test_unreachable_device_is_reported(tmp_path):
    with socket.socket() as probe:  # a loopback port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    inventory = tmp_path / "gone.yml"
    inventory.write_text(textwrap.dedent(f"""\
        all:
          hosts:
            gone:
              claw_profile: qemu-virt
              ansible_host: 127.0.0.1
              ansible_port: {port}
              ansible_user: root
    """))
    result = claw_subprocess("doctor", "-i", str(inventory), "--json",
                             env={"ANSIBLE_SSH_ARGS": "-o ConnectTimeout=5"})
    assert result.code == 1
    got = findings(result, "gone")
    assert got["device-unreachable"]["status"] == "fault"
    assert "refused" in got["device-unreachable"]["detail"].lower()
    assert set(got) == {"device-unreachable", "device-facts-failed"}  # nothing else is guessed
