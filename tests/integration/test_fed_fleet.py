"""`claw fed run` on three emulated devices, each with its own Docker engine holding the runtime
image built with the `fed` extra (Flower, PyTorch CPU, peft), its own shard of text and the
trained test model.

Pre-flight refusals (a device without the data directory; a device holding another model)
name the device and start nothing; SuperNode containers started over the playbook connect to a
SuperLink on this machine (seen through the SuperLink: `flwr supernode list`, matched against
each container's own log) and are removed afterwards; a whole `claw fed run` stops every client
and the SuperLink whatever its end, and is recorded in the history store.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import claw_subprocess, dexec
from tests.fed_text import held_out_loss, sensor_shards

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]  # fed_run's 1500 s and more

FLEET = f"fedfleet{os.getpid() % 100000}"
IMAGE = f"fedfleet-{os.getpid()}/runtime:fed"
DATA = "/srv/fed/text"
MODEL = "/var/lib/clawforge/models/base.gguf"
CONTAINER = "claw-fed-supernode"
SHARDS = sensor_shards(3)  # each device's own log (tests/fed_text.py)
MARGIN = 1.0  # nats/token the federated adapter must gain over the base on held-out text


@dataclass
class FedFleet:
    inventory: Path
    names: list[str]
    model: Path  # the controller's copy
    state: Path


def containers(name: str) -> list[str]:
    """The containers in a device's own engine, running or not."""
    return dexec(name, "docker ps -a --format '{{.Names}}'").split()


@pytest.fixture(scope="module")
def fed_fleet() -> Iterator[FedFleet]:
    """The fed image (its layers cached from the last run's build), three engine devices with
    it loaded, each with a shard of the training text and the model; all removed afterwards."""
    from images.base import docker_client
    from images.build import build_image
    from images.render import resolve
    from provision import devices
    from tests.trained_model import available, trained_model

    if why := available():
        pytest.skip(why)
    saved = os.environ.get("XDG_STATE_HOME")
    state = Path(tempfile.mkdtemp(prefix="fedfleet-state-"))
    os.environ["XDG_STATE_HOME"] = str(state)  # runs, history and inventories of this module
    try:
        model = trained_model().f32
        build_image(resolve("runtime", "qemu-virt", "amd64", "none", ("fed",)), tag=IMAGE,
                    progress=lambda *_: None)
        inventory = devices.devices_up(3, "qemu-virt", "amd64", fleet=FLEET, engine=True,
                                       progress=lambda _: None)
        names = list(yaml.safe_load(inventory.read_text())["all"]["children"]["emulated"]
                     ["hosts"])
        done = claw_subprocess("provision", "-i", str(inventory), "--tags", "docker_engine",
                               "--json")
        assert done.code == 0, done.out[-3000:] + done.err[-2000:]
        tar = state / "fed-image.tar"
        subprocess.run(["docker", "save", "-o", str(tar), IMAGE], check=True, timeout=600)

        def load(name: str) -> None:
            with tar.open("rb") as f:
                subprocess.run(["docker", "exec", "-i", name, "docker", "load"], stdin=f,
                               check=True, capture_output=True, timeout=900)

        with ThreadPoolExecutor(len(names)) as pool:  # the three engines load at once
            list(pool.map(load, names))
        for i, name in enumerate(names):
            dexec(name, f"mkdir -p {DATA} {Path(MODEL).parent}")
            subprocess.run(["docker", "cp", str(model), f"{name}:{MODEL}"], check=True)
            shard = state / f"shard{i}.txt"
            shard.write_text(SHARDS[i])
            subprocess.run(["docker", "cp", str(shard), f"{name}:{DATA}/shard.txt"], check=True)
        tar.unlink()
        yield FedFleet(inventory, names, model, state)
    finally:
        for device in devices.list_devices(FLEET):  # the devices' engines drop the 1.7 GB
            subprocess.run(["docker", "exec", device.name, "docker", "rmi", "-f", IMAGE],
                           capture_output=True, timeout=600)  # first, in steps
        devices.devices_down(fleet=FLEET)
        with contextlib.suppress(Exception):  # best effort: this module's image only; its
            # parents stay, so that the next run's build finds the 1.2 GB fed layer cached
            docker_client().images.remove(IMAGE, force=True, noprune=True)
        if saved is None:
            os.environ.pop("XDG_STATE_HOME", None)
        else:
            os.environ["XDG_STATE_HOME"] = saved
        shutil.rmtree(state, ignore_errors=True)


def fed_run(f: FedFleet, *args: str):
    """Two rounds on the three devices. Each round trains three clients at once on the
    controller's two cores: 300 s beside the e2e tier's QEMU in one trial, 526 s in another."""
    return claw_subprocess("fed", "run", "-i", str(f.inventory), "--model", str(f.model),
                           "--data-dir", DATA, "--device-model", MODEL, "--rounds", "2",
                           "--image", IMAGE, *args, timeout=1500)


def test_a_device_without_the_data_dir_is_refused_before_anything_starts(fed_fleet):
    from provision.fleet import history

    f, missing = fed_fleet, fed_fleet.names[1]
    dexec(missing, f"mv {DATA} {DATA}.away")
    try:
        done = fed_run(f, "--json")
    finally:
        dexec(missing, f"mv {DATA}.away {DATA}")
    assert done.code == 2, done.out[-2000:] + done.err[-2000:]
    assert "Traceback" not in done.err
    assert f"{missing}: data dir missing" in done.err
    assert "refused before the first round (1 of 3 devices not ready" in done.err
    assert not [n for n in f.names if n != missing and n in done.err]
    assert all(containers(n) == [] for n in f.names)  # no SuperNode was started
    run = history.fed_runs(1)[0]
    assert run["status"] == "refused" and run["rounds_done"] == 0
    assert missing in run["error"] and run["settings"]["clients"] == f.names


def test_a_device_holding_another_model_is_refused_naming_it(fed_fleet):
    f, other = fed_fleet, fed_fleet.names[2]
    dexec(other, f"cp {MODEL} {MODEL}.keep && printf x >> {MODEL}")
    try:
        done = fed_run(f)
    finally:
        dexec(other, f"mv {MODEL}.keep {MODEL}")
    assert done.code == 2, done.out[-2000:] + done.err[-2000:]
    assert re.search(rf"{other}: model sha256 [0-9a-f]{{12}}… differs from the controller's",
                     done.err), done.err
    assert not [n for n in f.names if n != other and n in done.err]
    assert all(containers(n) == [] for n in f.names)


def test_supernodes_connect_to_the_superlink_and_are_removed_after(fed_fleet, tmp_path):
    from provision.fed import fleet, runs

    f = fed_fleet
    settings = fleet.FedSettings(model=f.model, data_dir=DATA, rounds=1, device_model=MODEL,
                                 image=IMAGE)
    hosts = fleet.fleet_hosts(f.inventory)
    images = fleet.images_for(hosts, IMAGE)
    checks = fleet.preflight(f.inventory, f.names, settings, images,
                             runs.file_sha256(f.model))
    assert [(c.host, c.texts, bool(c.image_id)) for c in checks] == [
        (n, 1, True) for n in f.names]
    link = fleet.start_superlink(tmp_path, "127.0.0.1", "127.0.0.1")
    try:
        ports = dict(zip(f.names, fleet.free_ports(3), strict=True))
        fleet.start_clients(f.inventory, settings, link.address, images, ports)
        online = fleet.wait_for_nodes(link, 3, timeout=180)
        logged = set()
        for name in f.names:
            inspect = json.loads(dexec(name, f"docker inspect {CONTAINER}"))[0]
            assert inspect["State"]["Running"] and inspect["HostConfig"]["NetworkMode"] == "host"
            mounts = {m["Destination"]: m["RW"] for m in inspect["Mounts"]}
            assert mounts == {DATA: False, MODEL: False}  # the device's text stays read-only
            args = " ".join(inspect["Args"])
            assert f"--port {ports[name]}" in args
            assert f'data-dir="{DATA}" model="{MODEL}" name="{name}"' in args
            log = subprocess.run(["docker", "exec", name, "docker", "logs", CONTAINER],
                                 capture_output=True, text=True, timeout=60)
            logged |= set(re.findall(r"SuperNode ID: (\d+)", log.stdout + log.stderr))
        assert {n["node-id"] for n in online} == logged and len(logged) == 3
    finally:
        logs = fleet.stop_clients(f.inventory)
        link.stop()
    assert all(containers(n) == [] for n in f.names)
    assert all(any("SuperNode ID" in line for line in logs[n]) for n in f.names)
    assert not link.alive
    fleet.stop_clients(f.inventory)  # twice is harmless (the clean-up after any failure)


def test_a_run_trains_over_the_fleet(fed_fleet):
    from provision.fleet import history

    f = fed_fleet
    done = fed_run(f, "--json", "--local-steps", "5", "--lr", "1e-2")
    assert done.code == 0, done.out[-3000:] + done.err[-3000:]
    result = json.loads(done.out)
    assert result["status"] == "succeeded" and result["rounds_done"] == 2
    assert [r["clients_joined"] for r in result["rounds"]] == [3, 3]
    assert (Path(result["run_dir"]) / "adapter" / "adapter_model.safetensors").is_file()
    assert all(containers(n) == [] for n in f.names)
    assert history.fed_run(result["id"])["status"] == "succeeded"
    # Each device learnt from its own log: the held-out loss on the union of the shards falls.
    base = held_out_loss(f.model, SHARDS)
    tuned = held_out_loss(f.model, SHARDS, Path(result["run_dir"]) / "adapter")
    print(f"held-out loss on the union of the shards: base {base:.3f}, federated {tuned:.3f}")
    assert tuned < base - MARGIN
    # Learn on the fleet, deploy to the fleet: the run's adapter merged into a quantized GGUF
    # that the runtime serves (delivery to devices: tests/integration/test_fed_export.py).
    tuned = f.state / "tuned-q8_0.gguf"
    done = claw_subprocess("fed", "export", result["id"], "-o", str(tuned), "--quantize", "Q8_0")
    assert done.code == 0, done.err[-2000:]
    done = claw_subprocess("runtime", "generate", str(tuned), "--prompt", "The",
                           "--max-tokens", "8", "--temperature", "0")
    assert done.code == 0 and done.out.strip(), done.err[-2000:]
