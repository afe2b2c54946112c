"""Offline base images: a Debian root made with debootstrap, turned into an image by `docker
import`, because no registry can be reached. One recipe serves the emulated devices (systemd,
sshd) and the container images (a slim root the Dockerfile templates build FROM).

Each image is tagged by a hash of everything that went into it (suite, arch, mirror, packages,
recipe version), so a second request finds it and nothing is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.errors import BadInput, ClawError
from provision.paths import state_dir

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
ARCHES = ("amd64", "arm64")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BaseRecipe:
    """What a base image is made of; its hash is the image's tag."""

    repository: str
    packages: Sequence[str]
    recipe: int  # bump when the way the root is made changes
    changes: Sequence[str] = ()  # Dockerfile instructions applied by `docker import`
    # Record the root's architecture in the image config (engine 20.10's import writes the
    # host's), so images built FROM it say arm64 to the engines and registries of the fleet.
    true_arch: bool = False
    tidy: Callable[[Path], None] | None = field(default=None, compare=False)

    def tag(self, arch: str) -> str:
        key = hashlib.sha256(json.dumps([SUITE, arch, MIRROR, list(self.packages),
                                         self.recipe]).encode()).hexdigest()
        return f"{self.repository}:{SUITE}-{arch}-{key[:12]}"


def docker_client(timeout: int = 120) -> Any:
    """A connected Docker SDK client, or a ClawError that points at `claw doctor`.

    `timeout` bounds each socket read: a build step may print nothing for many minutes."""
    try:
        import docker
    except ImportError:
        raise ClawError("the Docker SDK is not installed (pip install 'clawforge[controller]'; "
                        "see `claw doctor`)") from None
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except Exception as exc:
        raise ClawError(f"the Docker engine is not reachable ({str(exc).splitlines()[0][:120]}); "
                        "run `claw doctor`") from None
    return client


def check_arch(arch: str) -> str:
    if arch not in ARCHES:
        raise BadInput(f"--arch {arch!r} is not supported (expected one of: {', '.join(ARCHES)})")
    return arch


def scratch_dir() -> Path:
    """Large temporary files live under the state directory, not a possibly small /tmp."""
    path = state_dir() / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_base(recipe: BaseRecipe, arch: str, progress: Progress = print) -> str:
    """The base image of `recipe` for `arch`, made from a debootstrap root unless cached."""
    check_arch(arch)
    client = docker_client()
    tag = recipe.tag(arch)
    if client.images.list(name=tag):
        return tag
    if shutil.which("debootstrap") is None:
        raise ClawError("debootstrap is not installed (apt-get install debootstrap; see "
                        "`claw doctor`)")
    work = Path(tempfile.mkdtemp(prefix=f"claw-rootfs-{arch}-", dir=scratch_dir()))
    try:
        root = work / "root"
        progress(f"debootstrap {SUITE} {arch} (about 1 min amd64, 2 min arm64)")
        include = [f"--include={','.join(recipe.packages)}"] if recipe.packages else []
        done = subprocess.run(
            ["debootstrap", f"--arch={arch}", "--variant=minbase", *include, SUITE, str(root),
             MIRROR], capture_output=True, text=True)
        if done.returncode != 0:
            tail = " | ".join(done.stdout.strip().splitlines()[-3:])
            raise ClawError(f"debootstrap {arch} failed: {tail}")
        shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
        (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
        (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
        if recipe.tidy:
            recipe.tidy(root)
        progress(f"docker import → {tag}")
        archive = work / "root.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(root, arcname=".")
        repository, version = tag.rsplit(":", 1)
        client.api.import_image(src=str(archive), repository=repository, tag=version,
                                changes=list(recipe.changes))
        archive.unlink()
        if recipe.true_arch and client.images.get(tag).attrs.get("Architecture") != arch:
            progress(f"recording architecture {arch} in {tag}")
            set_architecture(client, tag, arch, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tag


def set_architecture(client: Any, tag: str, arch: str, work: Path) -> None:
    """Rewrite the image config's architecture: `docker save`, edit the config, `docker load`.

    The config's file name is its sha256, so the manifest is pointed at the new name; layers
    are untouched. The old image (same layers) is removed."""
    old_id = client.images.get(tag).id
    folder = work / "saved"
    saved = work / "saved.tar"
    with open(saved, "wb") as out:
        for chunk in client.api.get_image(tag, chunk_size=1 << 20):
            out.write(chunk)
    with tarfile.open(saved) as tar:
        tar.extractall(folder, filter="tar")
    saved.unlink()
    manifest = json.loads((folder / "manifest.json").read_text())
    config_file = folder / manifest[0]["Config"]
    config = json.loads(config_file.read_text())
    config["architecture"] = arch
    if arch == "arm64":
        config["variant"] = "v8"
    data = json.dumps(config, separators=(",", ":")).encode()
    digest = hashlib.sha256(data).hexdigest()
    config_file.unlink()
    (folder / f"{digest}.json").write_bytes(data)
    manifest[0]["Config"] = f"{digest}.json"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "repositories").unlink(missing_ok=True)
    with tarfile.open(saved, "w") as tar:
        tar.add(folder, arcname=".")
    with open(saved, "rb") as f:
        for _ in client.api.load_image(f):
            pass
    if client.images.get(tag).id != old_id:
        client.images.remove(old_id, force=True)


# The container images' base: Debian minbase and TLS roots (pip reaches PyPI over HTTPS).
IMAGE_BASE = BaseRecipe(
    repository="clawforge/image-base", packages=["ca-certificates"], recipe=2,
    changes=['CMD ["/bin/bash"]', "ENV LANG=C.UTF-8"], true_arch=True)


def ensure_image_base(arch: str, progress: Progress = print) -> str:
    """The offline base the Dockerfile templates build FROM."""
    return ensure_base(IMAGE_BASE, arch, progress)
