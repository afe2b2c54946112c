"""Emulated devices with their own Docker engine (`claw devices up --engine`): the unchanged
docker_engine role configures and starts it, it stores layers with overlay2 on the device's
volume, an image saved on this machine loads into it (through `docker exec` and through the
device's SSH, as a rollout would deliver it), and a nested container runs on the host network.
The engine is still there after the device restarts, and `devices_down` removes the volumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from images.base import docker_client
from provision import devices
from provision.errors import BadInput
from provision.loopback import ssh_key
from tests.conftest import claw_subprocess, dexec

pytestmark = pytest.mark.integration

FLEET = f"claw-engtest-{os.getpid()}"
IMAGE = f"claw-engtest/load:{os.getpid()}"
PAYLOAD_MIB = 96  # on the 206 MB device base: a ~300 MB image, as a rollout would ship


@pytest.fixture(scope="module")
def fleet():
    inventory = devices.devices_up(2, "qemu-virt", "amd64", fleet=FLEET, engine=True,
                                   progress=lambda _: None)
    try:
        yield inventory, devices.list_devices(FLEET)
    finally:
        devices.devices_down(fleet=FLEET)


@pytest.fixture(scope="module")
def provisioned(fleet):
    inventory, _ = fleet
    return claw_subprocess("provision", "-i", str(inventory), "--tags", "docker_engine", "--json")


@pytest.fixture(scope="module")
def saved_image(tmp_path_factory):
    """A ~300 MB image (the device base and a layer of random bytes, which nothing can
    compress), saved to a tarball on this machine; its payload's sha256."""
    client = docker_client()
    # the plain device base (the fleet runs the engine's): built here if no test has made it
    base = devices.ensure_base_image("amd64", progress=lambda _: None)
    folder = tmp_path_factory.mktemp("engine-image")
    payload = os.urandom(PAYLOAD_MIB << 20)
    (folder / "payload.bin").write_bytes(payload)
    (folder / "Dockerfile").write_text(f"FROM {base}\n"
                                       "COPY payload.bin /payload.bin\n")
    client.images.build(path=str(folder), tag=IMAGE, rm=True, network_mode="host")
    tarball = folder / "image.tar"
    subprocess.run(f"docker save {IMAGE} > {tarball}", shell=True, check=True)
    try:
        yield tarball, hashlib.sha256(payload).hexdigest()
    finally:
        client.images.remove(IMAGE, force=True)


def timed_load(command: list[str], tarball: Path) -> float:
    start = time.perf_counter()
    with open(tarball, "rb") as stdin:
        done = subprocess.run(command, stdin=stdin, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and f"Loaded image: {IMAGE}" in done.stdout, done.stderr
    return time.perf_counter() - start


def ssh(port: int) -> list[str]:
    return ["ssh", "-i", str(ssh_key()), "-p", str(port), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "root@127.0.0.1"]


def test_engine_devices_are_labelled_and_listed(fleet):
    _, listed = fleet
    assert len(listed) == 2 and all(d.engine for d in listed)
    client = docker_client()
    for device in listed:
        container = client.containers.get(device.name)
        assert container.labels[devices.ENGINE_LABEL] == "1"
        mount = next(m for m in container.attrs["Mounts"] if m["Destination"] == "/var/lib/docker")
        assert mount["Type"] == "volume" and mount["Name"] == devices.engine_volume(device.name)
        # Installed, but not started before the role has written its daemon.json.
        assert dexec(device.name, "systemctl is-active docker") == "inactive"
    result = claw_subprocess("devices", "list", "--fleet", FLEET, "--json")
    assert result.code == 0, result.err
    assert [r["engine"] for r in json.loads(result.out)] == [True, True]


def test_a_fleet_keeps_one_kind_of_device(fleet):
    with pytest.raises(BadInput, match=f"fleet '{FLEET}' has devices with a Docker engine"):
        devices.devices_up(3, "qemu-virt", "amd64", fleet=FLEET, progress=lambda _: None)


def test_docker_engine_role_starts_an_overlay2_engine_without_a_bridge(fleet, provisioned):
    _, listed = fleet
    assert provisioned.code == 0, provisioned.out[-3000:] + provisioned.err[-2000:]
    hosts = {h["host"]: h for h in json.loads(provisioned.out)["hosts"]}
    for device in listed:
        assert hosts[device.name]["status"] == "ok"
        assert dexec(device.name, "systemctl is-active docker") == "active"
        assert dexec(device.name, "systemctl is-enabled docker") == "enabled"
        info = json.loads(dexec(device.name, "docker info --format '{{json .}}'"))
        assert info["Driver"] == "overlay2", info["Driver"]
        networks = dexec(device.name, "docker network ls --format '{{.Name}}'").split()
        assert sorted(networks) == ["host", "none"]
    again = claw_subprocess("provision", "-i", str(fleet[0]), "--tags", "docker_engine",
                            "--json")
    assert again.code == 0
    assert {h["host"]: h["changed"] for h in json.loads(again.out)["hosts"]} == \
        {d.name: 0 for d in listed}


def test_an_image_from_this_machine_loads_and_runs_nested(fleet, provisioned, saved_image):
    _, listed = fleet
    assert provisioned.code == 0
    tarball, payload_sha = saved_image
    first, second = listed
    seconds = timed_load(["docker", "exec", "-i", first.name, "docker", "load"], tarball)
    over_ssh = timed_load([*ssh(second.port), "docker", "load"], tarball)
    size_mb = tarball.stat().st_size / 1e6
    print(f"\ndocker load of a {size_mb:.0f} MB image into an engine device: "
          f"{seconds:.1f} s through docker exec, {over_ssh:.1f} s through SSH")
    for device in listed:
        # --network host: the nested container shares the device's network, which is this
        # machine's, so the device's own sshd answers it on 127.0.0.1.
        out = dexec(device.name, f"docker run --rm --network host {IMAGE} python3 -c \""
                                 "import hashlib, socket; "
                                 "print(hashlib.sha256(open('/payload.bin', 'rb').read())"
                                 ".hexdigest()); "
                                 f"print(socket.create_connection(('127.0.0.1', {device.port}))"
                                 ".recv(7).decode())\"")
        assert out.split() == [payload_sha, "SSH-2.0"], out


def test_the_engine_comes_back_when_the_device_restarts(fleet, provisioned, saved_image):
    _, listed = fleet
    device = listed[0]
    started = "systemctl show -p ExecMainStartTimestampMonotonic --value docker"
    before = dexec(device.name, started)
    assert before
    docker_client().containers.get(device.name).restart(timeout=10)
    deadline = time.monotonic() + 60
    while dexec(device.name, "systemctl is-active docker") != "active":
        assert time.monotonic() < deadline, dexec(device.name, "systemctl status docker")
        time.sleep(0.5)
    assert int(dexec(device.name, started)) > int(before)  # started again, by the boot
    # The images live on the volume: what was delivered survives the restart.
    assert dexec(device.name, f"docker image ls -q {IMAGE}")


def test_down_removes_the_devices_and_their_volumes(fleet):
    _, listed = fleet
    removed = devices.devices_down(fleet=FLEET)
    assert sorted(removed) == sorted(d.name for d in listed)
    volumes = {v.name for v in docker_client().volumes.list()}
    assert not {devices.engine_volume(d.name) for d in listed} & volumes
