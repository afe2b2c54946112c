"""Image builds end to end: runtime and dev-env for amd64 and arm64 (qemu-user) from the offline
base, each smoke-tested inside; labels; a cached rebuild; export → remove → import → run; a
failing RUN step and a failing smoke test named clearly; the dev-env started as developers do.

One build per (kind, arch) is shared by every test (session fixture). Test tags are removed
afterwards without pruning their parents, so Docker's layer cache stays warm for the next run.
"""

from __future__ import annotations

import re
import shutil
import uuid
from datetime import datetime

import pytest

from images.base import IMAGE_BASE, docker_client
from images.build import BuildResult, build_image, smoke_test
from images.render import KINDS, resolve, templates_dir

pytestmark = pytest.mark.e2e

PREFIX = "claw-imgtest-e2e"
PROFILE = "rpi5"  # arm64 board with PoCL: the same stack on both architectures


class Builds:
    def __init__(self) -> None:
        self.run = uuid.uuid4().hex[:8]
        self.results: dict[tuple[str, ...], BuildResult] = {}
        self.tags: list[str] = []

    def tag(self, name: str) -> str:
        tag = f"{PREFIX}/{name}:{self.run}"
        self.tags.append(tag)
        return tag

    def get(self, kind: str, arch: str, opencl: str | None = None) -> BuildResult:
        key = (kind, arch) if opencl is None else (kind, arch, opencl)
        if key not in self.results:
            target = resolve(kind, PROFILE, arch, opencl)
            self.results[key] = build_image(target, tag=self.tag("-".join(key)),
                                            progress=lambda message: None)
        return self.results[key]


@pytest.fixture(scope="session")
def builds():
    found = Builds()
    yield found
    client = docker_client()
    for container in client.containers.list(all=True, filters={"name": PREFIX}):
        container.remove(force=True)
    for tag in found.tags:
        if client.images.list(name=tag):
            client.images.remove(tag, force=True, noprune=True)


def _run(image: str, *command: str) -> str:
    out = docker_client().containers.run(image, list(command), entrypoint=[], remove=True,
                                         network_mode="host")
    return out.decode().strip()


def test_runtime_without_opencl_is_a_third_of_the_size_and_passes_its_self_test(builds):
    result = builds.get("runtime", "amd64", "none")
    checks = {c["name"]: c for c in result.smoke["checks"]}
    assert result.smoke["ok"] and checks["model"]["detail"]["backend"] == "numpy"
    assert "built with --opencl none" in checks["opencl"]["skipped"]
    assert result.labels["org.clawforge.opencl"] == "none"
    assert result.size_bytes < 350e6, result.size_bytes  # PoCL's image is ~1.07 GB
    packages = _run(result.tag, "dpkg-query", "-W", "-f", "${Package}\\n").split()
    assert "python3" in packages
    assert not [p for p in packages if re.search(r"pocl|ocl-icd|opencl|clang|llvm", p)], packages
    assert _run(result.tag, "sh", "-c", "ls /etc/OpenCL/vendors 2>&1 || true").endswith(
        "No such file or directory")


def test_runtime_amd64_is_smoke_tested_labelled_and_serves_health(builds):
    result = builds.get("runtime", "amd64")
    checks = {c["name"]: c for c in result.smoke["checks"]}
    assert result.smoke["ok"] and checks["model"]["detail"]["completion_tokens"] == 8
    assert checks["opencl"]["detail"]["platform"] == "Portable Computing Language"
    attrs = docker_client().images.get(result.tag).attrs
    labels = attrs["Config"]["Labels"]
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", labels["org.opencontainers.image.revision"])
    assert datetime.fromisoformat(labels["org.opencontainers.image.created"]).tzinfo
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert (labels["org.clawforge.profile"], labels["org.clawforge.arch"]) == (PROFILE, "amd64")
    config = attrs["Config"]
    assert "http://127.0.0.1:8080/health" in " ".join(config["Healthcheck"]["Test"])
    assert config["User"] == "10001"
    assert config["Entrypoint"] == ["claw", "runtime", "serve"]
    assert config["Cmd"] == ["--config", "/etc/clawforge/runtime.yml"]
    assert _run(result.tag, "id", "-u") == "10001"
    # The slim image carries the runtime extra only: no Ansible, no Docker SDK.
    assert _run(result.tag, "bash", "-c", "python -c 'import docker' 2>/dev/null || echo none") \
        == "none"


def test_cached_rebuild_reuses_every_layer(builds):
    cold = builds.get("runtime", "amd64")
    again = build_image(resolve("runtime", PROFILE, "amd64"), tag=builds.tag("runtime-again"),
                        progress=lambda message: None)
    work = [s for s in again.steps if not s.instruction.startswith("LABEL")]
    assert all(s.cached for s in work), [s.instruction for s in work if not s.cached]
    assert again.smoke["ok"] and len(again.steps) == len(cold.steps)


def test_export_remove_import_run(claw, builds, tmp_path):
    tag = builds.get("runtime", "amd64").tag
    out = tmp_path / "runtime.tar.zst"
    result = claw("image", "export", tag, "-o", str(out))
    assert result.code == 0, result.err
    client = docker_client()
    client.images.remove(tag, noprune=True)
    assert not client.images.list(name=tag)
    result = claw("image", "import", str(out))
    assert result.code == 0, result.err
    assert f"loaded {tag}" in result.out
    report = smoke_test(client, tag, "runtime", name_prefix=PREFIX)
    assert report["ok"]


def test_dev_env_amd64_has_its_tools_and_starts_like_run_dev(claw, builds, tmp_path):
    result = builds.get("dev-env", "amd64")
    assert result.smoke["ok"]  # the smoke test also checks gcc, cmake, clinfo, docker, ansible
    (tmp_path / "hello.c").write_text('int main(void) { return 0; }\n')
    tmp_path.chmod(0o777)
    name = f"{PREFIX}-dev-{builds.run}"
    started = claw("image", "run-dev", "--profile", PROFILE, "--arch", "amd64", "--image",
                   result.tag, "-w", str(tmp_path), "--name", name)
    assert started.code == 0, started.err
    assert "docker run -d --name " + name + " --network host" in " ".join(started.out.split())
    container = docker_client().containers.get(name)
    code, out = container.exec_run(["bash", "-c", "cd /workspace && gcc hello.c -o hello && "
                                    "./hello && sudo -n true && whoami && claw --version && "
                                    "ansible-playbook --version | head -1"])
    assert code == 0, out.decode()
    lines = out.decode().splitlines()
    assert lines[0] == "dev" and lines[1].startswith("claw 0.")
    assert lines[2].startswith("ansible-playbook [core")


@pytest.mark.parametrize("kind", list(KINDS))
def test_arm64_images_build_under_qemu_and_pass_their_smoke_test(builds, kind):
    result = builds.get(kind, "arm64")
    assert result.smoke["ok"]
    assert _run(result.tag, "uname", "-m") == "aarch64"
    image = docker_client().images.get(result.tag)
    assert image.labels["org.clawforge.arch"] == "arm64"
    assert image.attrs["Architecture"] == "arm64"  # what the fleet's engines will check


def _templates_with(tmp_path, kind: str, after: str, lines: str):
    shutil.copytree(templates_dir(), tmp_path / "templates")
    path = tmp_path / "templates" / KINDS[kind]
    text = path.read_text()
    assert after in text
    path.write_text(text.replace(after, after + lines, 1))
    return tmp_path / "templates"


def test_failing_run_step_is_named_with_its_log(claw, builds, tmp_path):
    templates = _templates_with(tmp_path, "runtime", "ARG DEBIAN_FRONTEND=noninteractive\n",
                                "RUN echo 'about to fail' && exit 7\n")
    tag = builds.tag("broken")
    result = claw("image", "build", "runtime", "--profile", PROFILE, "--arch", "amd64",
                  "--templates", str(templates), "--tag", tag)
    assert result.code == 1
    assert ("building the runtime image failed at step 4/" in result.err
            and "(RUN echo 'about to fail' && exit 7)" in result.err)
    assert "returned a non-zero code: 7" in result.err
    assert "| about to fail" in result.err and "Traceback" not in result.err
    assert not docker_client().images.list(name=tag)


def test_failing_smoke_test_leaves_the_image_untagged(claw, builds, tmp_path):
    builds.get("runtime", "amd64")  # its layers make this build quick
    templates = _templates_with(tmp_path, "runtime", "USER {{ uid }}\n",
                                "ENV OCL_ICD_VENDORS=/nonexistent\n")
    tag = builds.tag("no-opencl")
    result = claw("image", "build", "runtime", "--profile", PROFILE, "--arch", "amd64",
                  "--templates", str(templates), "--tag", tag)
    assert result.code == 1
    assert "the smoke test failed inside the runtime image: error: self-test failed: opencl:" \
        in result.err
    assert not docker_client().images.list(name=tag)


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_offline_base_is_cached_by_its_inputs_and_has_its_architecture(claw, builds, arch):
    builds.get("runtime", arch)  # made the base, if it was not cached already
    result = claw("image", "base", "--arch", arch)
    assert result.code == 0, result.err
    tag = result.out.strip().splitlines()[-1]
    assert tag == IMAGE_BASE.tag(arch) and "debootstrap" not in result.out  # found, not made
    image = docker_client().images.get(tag)
    assert image.attrs["Architecture"] == arch
    assert _run(tag, "dpkg", "--print-architecture") == arch


def test_runtime_container_serves_and_turns_healthy(builds, tmp_path):
    """The image as a device runs it: config mounted, model in its directory, and the image's
    health command (on a port of its own: the host network is shared) turning healthy."""
    import time

    from runtime.selftest import write_tiny_llama

    tag = builds.get("runtime", "amd64").tag
    models = tmp_path / "models"
    models.mkdir()
    write_tiny_llama(models / "model.gguf")
    (tmp_path / "runtime.yml").write_text(
        "model: /var/lib/clawforge/models/model.gguf\nhost: 127.0.0.1\nport: 18080\n"
        "backend: numpy\n")
    container = docker_client().containers.run(
        tag, name=f"{PREFIX}-serve-{builds.run}", detach=True, network_mode="host",
        volumes={str(tmp_path / "runtime.yml"): {"bind": "/etc/clawforge/runtime.yml",
                                                 "mode": "ro"},
                 str(models): {"bind": "/var/lib/clawforge/models", "mode": "ro"}},
        healthcheck={"test": ["CMD", "/opt/clawforge/bin/python", "-c",
                              "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen("
                              "'http://127.0.0.1:18080/health', timeout=4).status == 200 "
                              "else 1)"], "interval": 1_000_000_000, "start_period": 0,
                     "retries": 3, "timeout": 5_000_000_000})
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            container.reload()
            if container.attrs["State"]["Health"]["Status"] == "healthy":
                break
            assert container.status == "running", container.logs().decode()[-2000:]
            time.sleep(1)
        assert container.attrs["State"]["Health"]["Status"] == "healthy", \
            container.logs().decode()[-2000:]
    finally:
        container.remove(force=True)
