"""Fleets and releases to roll out in tests and benchmarks: engine devices set up for the runtime
container, the numpy-only runtime image, and releases made from it that differ the way real
ones do (a new version, one that never becomes healthy, one that fails on some boards only).
Each release is a one-instruction Dockerfile on top of the runtime image, so it costs a config
blob, not another copy of its layers."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from images.base import docker_client

# The marker file a "board revision B" device has in its model directory (mounted into the
# runtime container); the `rev-b` release refuses to start there.
REV_B_MARKER = "/var/lib/clawforge/models/rev-b"

FAILURES = {
    "": None,
    "always": "echo \"release {version}: cannot start (broken build)\" >&2; exit 3",
    "rev-b": (f"if [ -e {REV_B_MARKER} ]; then echo \"release {{version}} does not support "
              "board revision B\" >&2; exit 3; fi; exec claw runtime serve \"$@\""),
}


def release_image(base: str, tag: str, version: str, fail: str = "") -> str:
    """Build `tag` from `base` (a runtime image) as release `version`; `fail` picks how it
    breaks: "" (a good release), "always" or "rev-b"."""
    lines = [f"FROM {base}", f'LABEL org.clawforge.release="{version}"']
    script = FAILURES[fail]
    if script is not None:
        entry = ["/bin/sh", "-c", script.format(version=version), "claw-runtime"]
        lines.append(f"ENTRYPOINT {json.dumps(entry)}")
        # A new ENTRYPOINT drops the base image's CMD: give the server its arguments back.
        lines.append('CMD ["--config", "/etc/clawforge/runtime.yml"]')
    dockerfile = "\n".join(lines) + "\n"
    client = docker_client()
    client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True,
                        network_mode="host")
    return client.images.get(tag).id


def runtime_fleet(n: int, fleet: str, model: Path) -> tuple[Path, dict]:
    """`n` engine devices in `fleet` whose inventory runs the runtime as a container (numpy, one
    thread, `model`); returns the inventory and its `emulated` group. Hosts stay in file order:
    Ansible batches in that order."""
    import yaml

    from provision import devices

    inventory = devices.devices_up(n, "qemu-virt", "amd64", fleet=fleet, engine=True,
                                   progress=lambda _: None)
    data = yaml.safe_load(inventory.read_text())
    group = data["all"]["children"]["emulated"]
    group["vars"].update({"claw_runtime_model": str(model), "claw_runtime_backend": "numpy",
                          "claw_runtime_install": "container", "claw_runtime_threads": 1})
    inventory.write_text(yaml.safe_dump(data, sort_keys=False))
    return inventory, group


@dataclass
class ReleaseFleet:
    inventory: Path
    group: dict  # the inventory's `emulated` group
    names: list[str]  # the devices, in Ansible's order
    ports: dict[str, int]  # each device's runtime port on this machine
    releases: dict[str, str]  # version -> image tag
    work: Path


@contextlib.contextmanager
def release_fleet(n: int, fleet: str, prefix: str, work: Path, model: Path,
                  releases: dict[str, str]) -> Iterator[ReleaseFleet]:
    """`n` engine devices provisioned for the runtime container (docker_engine, claw_runtime),
    the numpy-only runtime image and `releases` (version -> how it fails, as release_image)
    built on it; the devices and this fleet's images are removed afterwards."""
    from images.build import build_image
    from images.render import resolve
    from provision import devices
    from tests.conftest import claw_subprocess

    model = Path(shutil.copy(model, work / "chat.gguf"))
    base = f"{prefix}/runtime:base"
    build_image(resolve("runtime", "qemu-virt", "amd64", "none"), tag=base,
                progress=lambda *_: None)
    tags = {version: f"{prefix}/runtime:{version}" for version in releases}
    try:
        for version, fail in releases.items():
            release_image(base, tags[version], version, fail=fail)
        inventory, group = runtime_fleet(n, fleet, model)
        done = claw_subprocess("provision", "-i", str(inventory), "--tags",
                               "docker_engine,claw_runtime", "--json")
        assert done.code == 0, done.out[-3000:] + done.err[-2000:]
        names = list(group["hosts"])
        yield ReleaseFleet(inventory, group, names,
                           {n: group["hosts"][n]["claw_runtime_port"] for n in names}, tags,
                           work)
    finally:
        devices.devices_down(fleet=fleet)
        client = docker_client()
        # with the names `--registry` pushes gave them (REGISTRY/PREFIX/runtime:VERSION)
        pushed = [t for image in client.images.list() for t in image.tags
                  if t.split("/", 1)[-1] in tags.values()]
        for tag in [*tags.values(), *pushed, base]:
            with contextlib.suppress(Exception):  # best effort: this fleet's images only
                client.images.remove(tag, force=True)
