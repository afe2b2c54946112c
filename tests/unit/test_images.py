"""Container images without building any: rendered Dockerfiles (hadolint-clean, with what each
kind promises), strict templates, the build stream parser, Kubernetes manifests checked against
Kubernetes' own schemas, the dev-env run line, and bad input of every kind."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from images import devenv
from images.base import IMAGE_BASE
from images.build import BuildLog, split_tag
from images.k8s import manifests, render_manifests
from images.render import KINDS, lint, render, resolve
from provision.profiles import ProfileStore

pytestmark = pytest.mark.unit

PROFILES = ProfileStore().names()
K8S_VERSION = "1.30"


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_rendered_dockerfile_passes_hadolint(kind, profile, arch):
    target = resolve(kind, profile, arch)
    text = render(target)
    findings = lint(text)
    assert not [f for f in findings if f["level"] == "error"], findings
    assert f"FROM {IMAGE_BASE.tag(arch)}\n" in text
    assert f"CLAW_PROFILE={profile}" in text
    for package in target.opencl.packages:
        assert package in text
    assert re.search(r"^USER 10001$", text, re.M)  # never root at run time


def test_hadolint_is_real_and_reports_errors():
    findings = lint("FROM debian\nRUN cd /tmp && make\nMAINTAINER me\n")
    codes = {f["code"] for f in findings}
    assert "DL3003" in codes and "DL4000" in codes


def test_runtime_image_serves_with_a_health_check_and_a_mounted_config():
    text = render(resolve("runtime", "rpi5"))
    assert 'ENTRYPOINT ["claw", "runtime", "serve"]' in text
    assert 'CMD ["--config", "/etc/clawforge/runtime.yml"]' in text
    health = next(line for line in text.splitlines() if "urlopen" in line)
    assert "http://127.0.0.1:8080/health" in health
    assert not [ln for ln in text.splitlines() if "curl" in ln and not ln.startswith("#")]
    # the dependencies in a layer of their own, cached across source changes; then the wheel
    deps, wheel = text.index("'numpy>=1.26'"), text.index('--no-deps "/tmp/clawforge-0.1.0-')
    assert deps < wheel and "ansible" not in text
    assert "pocl-opencl-icd" in text and "controller" not in text


def test_gpu_profiles_keep_pocl_as_the_cpu_fallback_and_the_stack_env():
    text = render(resolve("runtime", "rk3588"))
    assert "mesa-opencl-icd" in text and "pocl-opencl-icd" in text
    assert "RUSTICL_ENABLE=panfrost" in text
    only_pocl = render(resolve("runtime", "rk3588", opencl="pocl"))
    assert "mesa-opencl-icd" not in only_pocl and "RUSTICL_ENABLE" not in only_pocl


@pytest.mark.parametrize("profile", PROFILES)
def test_opencl_none_runtime_has_no_opencl_package_for_every_profile(profile):
    target = resolve("runtime", profile, "amd64", opencl="none")
    text = render(target)
    assert target.default_tag.endswith(f"-{profile}-amd64-numpy")
    assert not [f for f in lint(text) if f["level"] == "error"]
    install = next(ln for ln in text.splitlines() if "apt-get install" in ln)
    assert install.split("--no-install-recommends")[1].split() == ["python3", "python3-venv",
                                                                   "\\"]
    every_stack = {p for s in ProfileStore().get(profile).gpu.opencl for p in s.packages}
    assert every_stack and not [p for p in every_stack if p in text]
    assert not re.search(r"pocl|ocl-icd|opencl-icd|RUSTICL", text, re.I)
    assert "CLAW_OPENCL=none" in text and f"--profile {profile} --arch amd64 --opencl none" in text
    assert " && apt-get clean && rm -rf /var/lib/apt/lists/*\n" in text  # ~80 MB of apt caches


def test_every_runtime_image_says_its_opencl_stack_for_the_self_test():
    assert re.search(r"^ +CLAW_OPENCL=pocl\b", render(resolve("runtime", "rpi5")), re.M)
    assert re.search(r"^ +CLAW_OPENCL=rusticl\b", render(resolve("runtime", "rk3588")), re.M)


def test_requirements_from_the_source_tree_match_the_installed_metadata(tmp_path):
    from images.render import requirements

    for extras in ((), ("runtime",), ("controller",)):
        declared = requirements(*extras)
        assert declared and requirements(*extras, pyproject=tmp_path / "none.toml") == declared
    assert "numpy>=1.26" in requirements("runtime") and "numpy>=1.26" not in requirements()


def test_dev_env_has_the_toolchain_and_shares_the_runtime_layers():
    dev = render(resolve("dev-env", "rk3588", "arm64"))
    for tool in ("gcc g++ make", "cmake", "python3-dev", "clinfo", "docker.io", "sudo",
                 "'ansible-core>=2.16'", "NOPASSWD"):
        assert tool in dev
    runtime = render(resolve("runtime", "rk3588", "arm64"))

    def instructions(text: str) -> list[str]:
        joined = re.sub(r"\\\n", " ", text)
        return [ln for ln in joined.splitlines() if ln and not ln.startswith("#")]

    assert instructions(dev)[:9] == instructions(runtime)[:9]  # FROM … the wheel


def test_broken_template_variable_names_the_file_line_and_variable(claw, tmp_path):
    shutil.copy(Path(render.__code__.co_filename).parent / "templates" / KINDS["runtime"],
                tmp_path / KINDS["runtime"])
    path = tmp_path / KINDS["runtime"]
    lines = path.read_text().splitlines()
    lines.insert(5, "LABEL board={{ profile.board_name }}")
    path.write_text("\n".join(lines) + "\n")
    result = claw("image", "render", "runtime", "--profile", "rpi5", "--templates",
                  str(tmp_path))
    assert result.code == 2
    assert f"{path}:6:" in result.err and "board_name" in result.err
    assert "Traceback" not in result.err

    path.write_text("FROM x\n{% if %}\n")
    result = claw("image", "render", "runtime", "--profile", "rpi5", "--templates",
                  str(tmp_path))
    assert result.code == 2 and f"{path}:2: template syntax error" in result.err


@pytest.mark.parametrize("args, expected", [
    (["image", "render", "sandbox", "--profile", "rpi5"],
     "image kind 'sandbox' is not known (expected one of: runtime, dev-env)"),
    (["image", "render", "runtime", "--profile", "rpi6"], "unknown profile 'rpi6'"),
    (["image", "render", "runtime", "--profile", "rpi5", "--arch", "riscv64"],
     "--arch 'riscv64' is not supported (expected one of: amd64, arm64)"),
    (["image", "build", "runtime", "--profile", "rpi5", "--arch", "x86"],
     "--arch 'x86' is not supported"),
    (["image", "render", "runtime", "--profile", "rpi5", "--opencl", "rusticl"],
     "--opencl 'rusticl' is not a stack of profile rpi5 (expected one of: pocl, or none"),
    (["image", "render", "dev-env", "--profile", "rpi5", "--opencl", "none"],
     "--opencl none is for the runtime image only"),
    (["image", "base", "--arch", "s390x"], "--arch 's390x' is not supported"),
    (["image", "k8s", "--profile", "nope"], "unknown profile 'nope'"),
    (["image", "k8s", "--profile", "rpi5", "--model", "/root/m.gguf"],
     "--model '/root/m.gguf' is not valid"),
    (["image", "push", "x:1", "--registry", "a b"], "--registry 'a b' is not valid"),
    (["image", "import", "/nonexistent/x.tar.zst"], "/nonexistent/x.tar.zst: no such file"),
    (["image", "export", "x:1", "-o", "/tmp/out.zip"], "expected a file name ending in"),
])
def test_bad_input_is_one_clear_line_and_exit_2(claw, args, expected):
    result = claw(*args)
    assert result.code == 2, result
    assert expected in result.err
    assert "Traceback" not in result.err


def test_engine_not_running_points_at_claw_doctor(claw, monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    for args in (["image", "build", "runtime", "--profile", "rpi5", "--arch", "amd64"],
                 ["image", "export", "x:1", "-o", str(tmp_path / "x.tar.zst")],
                 ["image", "base"]):
        result = claw(*args)
        assert result.code == 1, (args, result)
        assert "the Docker engine is not reachable" in result.err and "claw doctor" in result.err
        assert "Traceback" not in result.err
    assert not list(tmp_path.iterdir())


# A build stream as the engine (20.10, classic builder) sends it, decoded.
STREAM = [
    {"stream": "Step 1/4 : FROM clawforge/image-base:bookworm-amd64-c7d4fba57676"},
    {"stream": "\n"}, {"stream": " ---> c7d4fba57676\n"},
    {"stream": "Step 2/4 : RUN apt-get update"}, {"stream": "\n"},
    {"stream": " ---> Using cache\n"}, {"stream": " ---> 0123456789ab\n"},
    {"stream": "Step 3/4 : RUN make all"}, {"stream": "\n"},
    {"stream": " ---> Running in 5d1e2f3a4b5c\n"},
    {"stream": "\x1b[91mcc -c main.c\nmain.c:3: error: expected ';'\n\x1b[0m"},
    {"errorDetail": {"code": 2, "message": "The command '/bin/sh -c make all' returned a "
                     "non-zero code: 2"}, "error": "The command '/bin/sh -c make all' "
                     "returned a non-zero code: 2"},
]


def test_build_stream_parser_counts_steps_and_names_the_failing_one():
    done = []
    log = BuildLog(on_step_done=done.append)
    for chunk in STREAM:
        log.feed(chunk)
    log.close()
    assert [s.number for s in log.steps] == [1, 2, 3] and log.steps[0].total == 4
    assert [s.cached for s in log.steps] == [True, True, False]  # FROM builds nothing
    assert log.steps[1].layer == "0123456789ab"
    assert [s.number for s in done] == [1, 2]  # the failing step never finished
    failure = log.failure("runtime")
    assert str(failure) == ("building the runtime image failed at step 3/4 (RUN make all): "
                            "The command '/bin/sh -c make all' returned a non-zero code: 2")
    assert failure.tail == ["cc -c main.c", "main.c:3: error: expected ';'"]  # no ANSI codes


def test_build_stream_parser_takes_the_image_id():
    log = BuildLog()
    for chunk in [{"stream": "Step 1/1 : FROM scratch\n"}, {"aux": {"ID": "sha256:abc"}},
                  {"stream": "Successfully built abc\n"}]:
        log.feed(chunk)
    log.close()
    assert log.image_id == "sha256:abc" and log.error is None


def test_split_tag():
    assert split_tag("reg.local:5000/clawforge/runtime:1.0") == ("reg.local:5000/clawforge/runtime",
                                                                 "1.0")
    assert split_tag("reg.local:5000/runtime") == ("reg.local:5000/runtime", "latest")


@pytest.mark.parametrize("profile", PROFILES)
def test_k8s_manifests_pass_the_kubernetes_schemas(claw, profile):
    result = claw("image", "k8s", "--profile", profile)
    assert result.code == 0, result.err
    docs = list(yaml.safe_load_all(result.out))
    assert [d["kind"] for d in docs] == ["ConfigMap", "DaemonSet", "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    prof = ProfileStore().get(profile)
    pod = docs[1]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/arch": prof.arch,
                                   "clawforge.io/profile": profile}
    (container,) = pod["containers"]
    limits = container["resources"]["limits"]
    assert limits["cpu"] == str(prof.runtime.threads)
    budget_mib = int(min(prof.ram_gb) * prof.runtime.memory_budget_fraction * 1024)
    assert limits["memory"] == f"{budget_mib}Mi"
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    config = yaml.safe_load(docs[0]["data"]["runtime.yml"])
    assert config["port"] == 8080 and config["threads"] == prof.runtime.threads
    assert docs[2]["spec"]["selector"] == docs[1]["spec"]["selector"]["matchLabels"]


def test_k8s_config_map_is_a_valid_serve_config(tmp_path):
    from runtime.server.config import load_config

    doc = manifests("rk3588")[0]
    path = tmp_path / "runtime.yml"
    path.write_text(doc["data"]["runtime.yml"])
    config = load_config(path)
    assert (config.host, config.port, config.threads) == ("0.0.0.0", 8080, 4)
    assert str(config.model) == "/var/lib/clawforge/models/model.gguf"
    assert config.monitor.profile == "rk3588"


def test_k8s_schema_check_rejects_a_broken_manifest():
    daemonset = manifests("rpi5")[1]
    daemonset["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["periodSeconds"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, K8S_VERSION, strict=True)
    assert "&id" not in render_manifests("rk3588")  # plain YAML, no anchors


def test_run_dev_line_has_devices_host_network_and_workspace(claw, tmp_path, monkeypatch):
    fake_dri = tmp_path / "dri"
    fake_dri.mkdir()
    monkeypatch.setattr(devenv, "DEVICE_PATHS", (str(fake_dri), str(tmp_path / "mali0")))
    result = claw("image", "run-dev", "--profile", "rk3588", "-w", str(tmp_path), "--dry-run")
    assert result.code == 0, result.err
    line = " ".join(result.out.split())
    assert line.startswith("docker run -d --name claw-dev-rk3588-arm64 --network host")
    assert f"--device {fake_dri}:{fake_dri}" in line and "mali0" not in line
    assert f"-v {tmp_path}:/workspace" in line and "-e RUSTICL_ENABLE=panfrost" in line
    assert "clawforge/dev-env:0.1.0-rk3588-arm64 sleep infinity" in line
    privileged = claw("image", "run-dev", "--profile", "rpi5", "--privileged", "--dry-run",
                      "-w", str(tmp_path))
    assert "--privileged" in privileged.out and "--device" not in privileged.out


def test_image_build_json_record_is_serialisable():
    from images.build import BuildResult, Step

    result = BuildResult("t:1", "sha256:x", 1.0, 10, [Step(1, 1, "FROM x", 0.0, cached=True)],
                         {"a": "b"}, {"ok": True})
    assert json.loads(json.dumps(result.record()))["cached_steps"] == 1


def test_fed_extra_installs_the_local_cpu_torch_wheel_in_its_own_layer(tmp_path, monkeypatch):
    wheel = tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(b"")
    (tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_aarch64.whl").write_bytes(b"")
    (tmp_path / "torch-2.13.0-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    target = resolve("runtime", "qemu-virt", "amd64", "none", ("fed",))
    assert target.default_tag.endswith("-amd64-numpy-fed")
    text = render(target)
    assert not [f for f in lint(text) if f["level"] == "error"]
    layer = next(b for b in text.split("\nRUN ") if "flwr" in b)
    assert f"'/tmp/wheels/{wheel.name}'" in layer and "'torch>=" not in layer
    assert "'peft>=" in layer and "numpy" not in layer  # the runtime's own layer stays apart
    assert "COPY wheels/ /tmp/wheels/" in text
    arm = render(resolve("runtime", "qemu-virt", "arm64", "none", ("fed",)))
    assert "manylinux_2_28_aarch64.whl'" in arm and "x86_64" not in arm
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "none"))
    plain = render(target)  # no local wheel: torch from the index, no wheels/ copied
    assert "'torch>=2.2'" in plain and "COPY wheels/" not in plain


@pytest.mark.parametrize("kind,extras,needle", [
    ("runtime", ("cuda",), "'cuda' is not an extra"),
    ("runtime", ("controller",), "expected one of: fed"),
    ("dev-env", ("fed",), "runtime image only")])
def test_bad_extras_are_refused_before_rendering(kind, extras, needle):
    from provision.errors import BadInput

    with pytest.raises(BadInput, match=re.escape(needle)):
        resolve(kind, "qemu-virt", "amd64", extras=extras)
