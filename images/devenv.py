"""The dev-env container as a device developer needs it: the board's GPU and USB devices (or
every device with --privileged), the host's network, the workspace and the Docker socket.

The spec is one value both the SDK call and the printed `docker run` line come from, so the
line a developer copies starts exactly the same container.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from images.render import resolve
from provision.errors import BadInput, ClawError

# GPU render nodes (Mesa, PoCL-CUDA), the Mali blob's device, USB for flashing and debug probes.
DEVICE_PATHS = ("/dev/dri", "/dev/mali0", "/dev/bus/usb")
DOCKER_SOCKET = "/var/run/docker.sock"


@dataclass
class DevRunSpec:
    image: str
    name: str
    workspace: Path
    privileged: bool
    devices: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    mounts: dict[str, str] = field(default_factory=dict)  # host path → container path

    def command_line(self) -> str:
        args = ["docker", "run", "-d", "--name", self.name, "--network", "host"]
        args += ["--privileged"] if self.privileged else []
        for device in self.devices:
            args += ["--device", f"{device}:{device}"]
        for host, inside in self.mounts.items():
            args += ["-v", f"{host}:{inside}"]
        for key, value in self.env.items():
            args += ["-e", f"{key}={value}"]
        args += ["-w", "/workspace", self.image, "sleep", "infinity"]
        return shlex.join(args)


def dev_run_spec(profile: str, arch: str | None, image: str | None, workspace: Path,
                 privileged: bool, name: str | None) -> DevRunSpec:
    target = resolve("dev-env", profile, arch)
    workspace = workspace.expanduser().resolve()
    if not workspace.is_dir():
        raise BadInput(f"--workspace {workspace}: no such directory")
    mounts = {str(workspace): "/workspace"}
    if Path(DOCKER_SOCKET).exists():
        mounts[DOCKER_SOCKET] = DOCKER_SOCKET
    devices = [] if privileged else [d for d in DEVICE_PATHS if Path(d).exists()]
    return DevRunSpec(image=image or target.default_tag,
                      name=name or f"claw-dev-{target.profile.name}-{target.arch}",
                      workspace=workspace, privileged=privileged, devices=devices,
                      env={"CLAW_PROFILE": target.profile.name, **target.opencl.env},
                      mounts=mounts)


def start_dev(spec: DevRunSpec) -> str:
    """Start the container detached (it waits; developers `docker exec` into it)."""
    import docker

    from images.base import docker_client

    client = docker_client()
    try:
        client.images.get(spec.image)
    except docker.errors.ImageNotFound:
        raise BadInput(f"image {spec.image!r} not found (expected a built dev-env: "
                       f"claw image build dev-env --profile ...)") from None
    try:
        container = client.containers.run(
            spec.image, ["sleep", "infinity"], name=spec.name, detach=True,
            network_mode="host", privileged=spec.privileged,
            devices=[f"{d}:{d}" for d in spec.devices], environment=spec.env,
            volumes={h: {"bind": c, "mode": "rw"} for h, c in spec.mounts.items()},
            working_dir="/workspace")
    except docker.errors.APIError as exc:
        raise ClawError(f"starting {spec.name} failed: {exc.explanation or exc}") from None
    return container.name
