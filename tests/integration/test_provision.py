"""`claw provision` against emulated devices: real effects, idempotence, check mode, failures.

Each test module starts its own fleet of device containers (systemd + sshd on loopback ports)
and removes it afterwards. Kernel-level effects (a zram swap, nr_hugepages) cannot show in a
container; here the persistent files and units are asserted, and the roles' own notes that
the live part was skipped. The QEMU VM in tests/e2e checks the live part.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml

from provision import devices
from provision.provisioning import provision
from tests.conftest import claw_subprocess, dexec

pytestmark = pytest.mark.integration

FLEET = f"t{os.getpid()}"


def summary(result) -> dict:
    assert "Traceback" not in result.err
    return {h["host"]: h for h in json.loads(result.out)["hosts"]}


@pytest.fixture(scope="module")
def fleet():
    inventory = devices.devices_up(3, "qemu-virt", "amd64", fleet=FLEET,
                                   progress=lambda _: None)
    data = yaml.safe_load(inventory.read_text())
    data["all"]["children"]["emulated"]["vars"]["claw_hugepages_mb"] = 64  # 32 pages of 2 MB
    inventory.write_text(yaml.safe_dump(data))
    yield inventory, [d.name for d in devices.list_devices(FLEET)]
    devices.devices_down(fleet=FLEET)


@pytest.fixture(scope="module")
def first_run(fleet):
    inventory, _ = fleet
    return claw_subprocess("provision", "-i", str(inventory), "--json")


def test_first_run_provisions_every_device(fleet, first_run):
    _, names = fleet
    assert first_run.code == 0, first_run.out[-3000:] + first_run.err[-2000:]
    hosts = summary(first_run)
    assert set(hosts) == set(names)
    for name in names:
        host = hosts[name]
        assert host["status"] == "ok" and host["changed"] > 0
        assert any("zram" in note for note in host["skipped_live"]), host["skipped_live"]
        zram = dexec(name, "cat /etc/systemd/zram-generator.conf")
        assert "compression-algorithm = zstd" in zram and "zram-size" in zram
        assert "vm.nr_hugepages = 32" in dexec(name, "cat /etc/sysctl.d/60-claw-hugepages.conf")
        assert "vm.swappiness" in dexec(name, "cat /etc/sysctl.d/70-claw-tuning.conf")
        assert dexec(name, "systemctl is-enabled claw-cpu-governor.service") == "enabled"
        assert "Portable Computing Language" in dexec(name, "clinfo -l")
        assert dexec(name, "systemctl is-active docker") == "active"
        assert json.loads(dexec(name, "cat /etc/docker/daemon.json"))["bridge"] == "none"
        assert json.loads(dexec(name, "cat /etc/clawforge/host.json"))["profile"] == "qemu-virt"


def test_second_run_changes_nothing(fleet, first_run):
    inventory, names = fleet
    assert first_run.code == 0
    second = claw_subprocess("provision", "-i", str(inventory), "--json")
    assert second.code == 0, second.out[-2000:]
    assert {h: s["changed"] for h, s in summary(second).items()} == dict.fromkeys(names, 0)


def test_last_shows_the_last_run(fleet, first_run):
    last = claw_subprocess("provision", "--last", "--json")
    assert last.code == 0 and json.loads(last.out)["inventory"] == str(fleet[0])


def test_bad_tags_limits_and_extra_vars(fleet):
    inventory, _ = fleet
    cases = [
        (["--tags", "zram,frobnicate"], "--tags frobnicate: unknown (expected role names"),
        (["--limit", "nosuchhost"], "--limit 'nosuchhost' matches no host or group"),
        (["-e", "novalue"], "-e 'novalue' is not valid (expected key=value or @file.yml)"),
    ]
    for args, message in cases:
        result = claw_subprocess("provision", "-i", str(inventory), *args)
        assert result.code == 2 and message in result.err, result.err


def test_argument_specs_reject_bad_variables(fleet):
    inventory, names = fleet
    result = claw_subprocess("provision", "-i", str(inventory), "--limit", names[0],
                             "--tags", "zram", "-e", "zram_algorithm=gzip", "--json")
    assert result.code == 1
    host = summary(result)[names[0]]
    assert host["status"] == "failed"
    assert "zram_algorithm" in host["message"] and "gzip" in host["message"]


def test_check_mode_changes_nothing_on_a_fresh_device():
    inventory = devices.devices_up(1, "qemu-virt", "amd64", fleet=FLEET + "c",
                                   progress=lambda _: None)
    try:
        (name,) = [d.name for d in devices.list_devices(FLEET + "c")]
        result = claw_subprocess("provision", "-i", str(inventory), "--check", "--json",
                                 "--tags", "base,zram,hugepages,cpu_governor,tuning")
        assert result.code == 0, result.out[-2000:]
        assert summary(result)[name]["changed"] > 0  # it reports what would change...
        assert dexec(name, "ls /etc/systemd/zram-generator.conf 2>/dev/null") == ""  # ...only
        assert dexec(name, "ls /etc/clawforge 2>/dev/null") == ""
        shown = claw_subprocess("provision", "-i", str(inventory), "--check", "--diff",
                                "--tags", "zram")
        assert shown.code == 0, shown.out[-2000:]
        assert "zram-generator.conf" in shown.out and "+compression-algorithm = zstd" in shown.out
        assert dexec(name, "ls /etc/systemd/zram-generator.conf 2>/dev/null") == ""
    finally:
        devices.devices_down(fleet=FLEET + "c")


def test_a_device_that_goes_away_is_unreachable_while_the_others_finish():
    fleet = FLEET + "u"
    inventory = devices.devices_up(3, "qemu-virt", "amd64", fleet=fleet,
                                   progress=lambda _: None)
    try:
        names = [d.name for d in devices.list_devices(fleet)]
        victim = names[1]
        killed = []

        def kill_after_first_task(event):
            data = event.get("event_data", {})
            if (event.get("event") == "runner_on_ok" and data.get("host") == victim
                    and not killed):
                subprocess.run(["docker", "kill", victim], capture_output=True, check=True)
                killed.append(victim)

        result, records = provision(inventory, tags=["base", "hugepages", "tuning"],
                                    on_event=kill_after_first_task)
        by_host = {r["host"]: r for r in records}
        assert killed == [victim]
        assert by_host[victim]["status"] in ("unreachable", "failed")
        assert by_host[victim]["message"]
        assert [by_host[n]["status"] for n in names if n != victim] == ["ok", "ok"]
        assert result.rc != 0
    finally:
        devices.devices_down(fleet=fleet)
