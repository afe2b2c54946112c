"""Releases to roll out in tests: the numpy-only runtime image, and releases made from it that
differ the way real ones do (a new version, one that never becomes healthy, one that fails on
some boards only). Each is a one-instruction Dockerfile on top of the runtime image, so a
release costs a config blob, not another copy of its layers."""

from __future__ import annotations

import io
import json

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
