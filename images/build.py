"""Building an image through the Docker SDK's low-level API, then smoke-testing it.

The engine's build stream is JSON lines (`stream`, `aux`, `error`/`errorDetail`); `BuildLog`
turns them into steps (instruction, cached or built, seconds, layer) and keeps a tail of the
output, so a failure names its step and shows what the step printed. An image is tagged only
after the runtime's self-test passed inside it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import tomllib
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from images.base import docker_client, ensure_image_base, scratch_dir
from images.render import CA_BUNDLE, Target, local_wheels, render, wheel_name
from images.wheel import ensure_wheel, source_root
from provision import __version__
from provision.errors import ClawError

ANSI = re.compile(r"\x1b\[[0-9;]*m")
STEP = re.compile(r"^Step (\d+)/(\d+) : (.*)$")
LAYER = re.compile(r"^ ---> ([0-9a-f]{12,64})$")
TAIL_LINES = 20
BUILD_READ_TIMEOUT_S = 3600  # a quiet step (pip under qemu-user) may print nothing for minutes
SMOKE_TIMEOUT_S = 900  # arm64 images run under qemu-user: numpy and PoCL start slowly
TOOLS = ("gcc", "g++", "make", "cmake", "clinfo", "docker", "ansible-playbook", "sudo", "pytest")


@dataclass
class Step:
    number: int
    total: int
    instruction: str
    started: float
    seconds: float = 0.0
    cached: bool = False
    layer: str | None = None


class BuildFailed(ClawError):
    """A build or smoke test failed; `tail` is the output that explains it."""

    def __init__(self, message: str, tail: list[str]):
        super().__init__(message)
        self.tail = tail


@dataclass
class BuildLog:
    """The state of one build, fed the decoded JSON chunks of the engine's stream."""

    on_step: Callable[[Step], None] = lambda step: None
    on_step_done: Callable[[Step], None] = lambda step: None
    on_line: Callable[[str], None] = lambda line: None
    steps: list[Step] = field(default_factory=list)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    image_id: str | None = None
    error: str | None = None

    def feed(self, chunk: dict[str, Any]) -> None:
        if "error" in chunk or "errorDetail" in chunk:
            detail = chunk.get("errorDetail") or {}
            self.error = (detail.get("message") or chunk.get("error") or "unknown error").strip()
            return
        if isinstance(chunk.get("aux"), dict) and "ID" in chunk["aux"]:
            self.image_id = chunk["aux"]["ID"]
        for line in ANSI.sub("", str(chunk.get("stream", ""))).splitlines():
            self._line(line.rstrip())

    def _line(self, line: str) -> None:
        if not line:
            return
        if m := STEP.match(line):
            self._finish()
            step = Step(int(m[1]), int(m[2]), m[3], time.monotonic())
            step.cached = step.instruction.upper().startswith("FROM ")  # nothing is built
            self.steps.append(step)
            self.on_step(step)
            return
        current = self.steps[-1] if self.steps else None
        if line == " ---> Using cache" and current:
            current.cached = True
        elif (m := LAYER.match(line)) and current:
            current.layer = m[1]
        elif line.startswith((" ---> Running in ", "Removing intermediate container ")):
            pass
        else:
            if line.startswith("Successfully built ") and not self.image_id:
                self.image_id = line.split()[-1]
            self.tail.append(line)
            self.on_line(line)

    def _finish(self) -> None:
        if self.steps and not self.steps[-1].seconds:
            step = self.steps[-1]
            step.seconds = time.monotonic() - step.started
            self.on_step_done(step)

    def close(self) -> None:
        if self.error is None:
            self._finish()

    def failure(self, kind: str) -> BuildFailed:
        step = self.steps[-1] if self.steps else None
        where = (f"step {step.number}/{step.total} ({_short(step.instruction)})" if step
                 else "before the first step")
        return BuildFailed(f"building the {kind} image failed at {where}: {self.error}",
                           list(self.tail))


def _short(text: str, width: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def _same_fs(a: Path, b: Path) -> bool:
    """A hard link saves copying a large wheel (torch: 190 MB) into the build context."""
    return a.stat().st_dev == b.stat().st_dev


def host_ca_bundle() -> Path:
    """The CA bundle this machine's pip trusts (PIP_CERT, SSL_CERT_FILE or Debian's)."""
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"),
                      "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise ClawError("no CA bundle found for pip inside the build (expected "
                    "/etc/ssl/certs/ca-certificates.crt; apt-get install ca-certificates)")


def git_revision(root: Path) -> str:
    """HEAD of the source tree, with -dirty when it has uncommitted changes."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def oci_labels(target: Target, root: Path) -> dict[str, str]:
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    return {
        "org.opencontainers.image.title": f"clawforge-{target.kind}",
        "org.opencontainers.image.source": project.get("urls", {}).get("Source", "unknown"),
        "org.opencontainers.image.revision": git_revision(root),
        "org.opencontainers.image.created": datetime.now(UTC).isoformat(timespec="seconds"),
        "org.opencontainers.image.version": __version__,
        "org.clawforge.kind": target.kind,
        "org.clawforge.profile": target.profile.name,
        "org.clawforge.arch": target.arch,
        "org.clawforge.opencl": target.opencl.name,
        "org.clawforge.extras": ",".join(target.extras),
    }


@dataclass
class BuildResult:
    tag: str
    image_id: str
    seconds: float
    size_bytes: int
    steps: list[Step]
    labels: dict[str, str]
    smoke: dict[str, Any] | None
    smoke_seconds: float = 0.0

    @property
    def cached_steps(self) -> int:
        return sum(s.cached for s in self.steps)

    def record(self) -> dict[str, Any]:
        return {"tag": self.tag, "image_id": self.image_id, "seconds": round(self.seconds, 2),
                "size_bytes": self.size_bytes, "steps": len(self.steps),
                "cached_steps": self.cached_steps, "smoke_seconds": round(self.smoke_seconds, 2),
                "labels": self.labels, "smoke": self.smoke}


def run_build(client: Any, context_dir: Path, labels: dict[str, str], no_cache: bool,
              log: BuildLog, kind: str) -> str:
    """Stream one build through the low-level API; the built image's id, or BuildFailed."""
    import docker

    try:
        stream: Iterable[dict[str, Any]] = client.api.build(
            path=str(context_dir), dockerfile="Dockerfile", rm=True, forcerm=True,
            nocache=no_cache, pull=False, network_mode="host", labels=labels, decode=True)
        for chunk in stream:
            log.feed(chunk)
    except docker.errors.APIError as exc:  # refused before streaming: a Dockerfile error
        log.error = str(exc.explanation or exc)
    log.close()
    if log.error or not log.image_id:
        log.error = log.error or "the engine reported no image id"
        raise log.failure(kind)
    return log.image_id


def split_tag(tag: str) -> tuple[str, str]:
    """'registry:5000/repo:v1' → ('registry:5000/repo', 'v1'); no tag means 'latest'."""
    if ":" in tag.rsplit("/", 1)[-1]:
        repository, version = tag.rsplit(":", 1)
        return repository, version
    return tag, "latest"


# What an extra must bring into the image, checked before the runtime's self-test.
EXTRA_SMOKE = {"fed": "python -c 'import flwr, peft, torch' && flower-supernode --help >/dev/null"}


def smoke_command(kind: str, extras: tuple[str, ...] = ()) -> list[str]:
    selftest = "claw runtime selftest --json"
    if kind == "runtime" and extras:
        checks = " && ".join(f"{{ {EXTRA_SMOKE[e]} || {{ echo 'error: the {e} extra is not "
                             f"usable' >&2; exit 3; }}; }}" for e in extras)
        return ["bash", "-c", f"{checks} && {selftest}"]
    if kind == "runtime":
        return ["claw", "runtime", "selftest", "--json"]
    check = "; ".join(f"command -v {t} >/dev/null || {{ echo 'missing tool: {t}' >&2; exit 3; }}"
                      for t in TOOLS)
    return ["bash", "-c", f"{check}; {selftest}"]


def smoke_test(client: Any, image: str, kind: str, timeout: float = SMOKE_TIMEOUT_S,
               name_prefix: str = "claw-smoke", extras: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run the runtime's self-test inside `image`; its JSON report, or BuildFailed."""
    name = f"{name_prefix}-{uuid.uuid4().hex[:8]}"
    container = client.containers.create(image, smoke_command(kind, extras), entrypoint=[],
                                         name=name,
                                         network_mode="host", detach=True)
    try:
        container.start()
        try:
            status = container.wait(timeout=timeout)["StatusCode"]
        except Exception:
            raise BuildFailed(f"the smoke test in {image[:19]} did not finish in {timeout:.0f} s",
                              []) from None
        out = container.logs(stdout=True, stderr=False).decode(errors="replace")
        err = container.logs(stdout=False, stderr=True).decode(errors="replace")
    finally:
        container.remove(force=True)
    try:
        report = json.loads(out)
    except json.JSONDecodeError:
        report = None
    if status != 0 or not isinstance(report, dict) or not report.get("ok"):
        errors = err.strip().splitlines()
        reason = next((ln for ln in reversed(errors) if ln.startswith(("error:", "missing"))),
                      f"exit status {status}")
        lines = (out.strip().splitlines() + errors)[-TAIL_LINES:]
        raise BuildFailed(f"the smoke test failed inside the {kind} image: {reason}", lines)
    return report


def build_image(target: Target, *, tag: str | None = None, no_cache: bool = False,
                template_dir: Path | None = None, smoke: bool = True, log: BuildLog | None = None,
                progress: Callable[[str], None] = print) -> BuildResult:
    """Render, build, smoke-test and tag one image; nothing is tagged unless all passed."""
    start = time.monotonic()
    log = log or BuildLog()
    dockerfile = render(target, template_dir)  # bad templates fail before any work
    client = docker_client(timeout=BUILD_READ_TIMEOUT_S)
    ensure_image_base(target.arch, progress)
    wheel = ensure_wheel(progress)
    root = source_root()
    labels = oci_labels(target, root)
    with tempfile.TemporaryDirectory(prefix="claw-context-", dir=scratch_dir()) as tmp:
        context_dir = Path(tmp)
        (context_dir / "Dockerfile").write_text(dockerfile)
        shutil.copy2(wheel, context_dir / wheel_name())
        shutil.copy2(host_ca_bundle(), context_dir / CA_BUNDLE)
        if target.extras:
            (context_dir / "wheels").mkdir()
            for local in local_wheels(target).values():
                if _same_fs(local, context_dir):
                    os.link(local, context_dir / "wheels" / local.name)
                else:
                    shutil.copy2(local, context_dir / "wheels")
        image_id = run_build(client, context_dir, labels, no_cache, log, target.kind)
    report, smoke_start = None, time.monotonic()
    if smoke:
        progress(f"smoke test: claw runtime selftest inside {image_id[:19]}")
        report = smoke_test(client, image_id, target.kind, extras=target.extras)
    smoke_seconds = time.monotonic() - smoke_start
    final = tag or target.default_tag
    repository, version = split_tag(final)
    client.api.tag(image_id, repository, version)
    size = client.images.get(image_id).attrs.get("Size", 0)
    return BuildResult(final, image_id, time.monotonic() - start, size, log.steps, labels, report,
                       smoke_seconds)
