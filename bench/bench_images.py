"""Image builds: cold (every layer rebuilt) vs cached rebuild, and image sizes, per kind and arch.

The peer of a cached rebuild is the cold build of the same image measured in the same run: the
ratio cached/cold is what an unchanged rebuild costs (target ≤ 0.10). Both exclude the smoke
test, which is timed on its own. The offline base image and the wheel are inputs, cached by
their hashes in both cases (`claw image base` makes the base; its time is reported when it had
to be made).

    .venv/bin/python bench/bench_images.py [--kinds runtime,dev-env] [--arches amd64,arm64] [--json]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import print_report  # noqa: E402

PROFILE = "rpi5"


def measure(kind: str, arch: str) -> dict:
    from images.base import docker_client, ensure_image_base
    from images.build import build_image
    from images.render import resolve

    start = time.perf_counter()
    ensure_image_base(arch, progress=lambda _: None)
    base_s = time.perf_counter() - start
    target = resolve(kind, PROFILE, arch)
    tag = f"claw-imgbench/{kind}-{arch}:{uuid.uuid4().hex[:8]}"
    quiet = {"progress": lambda _: None}
    try:
        cold = build_image(target, tag=tag, no_cache=True, **quiet)
        cached = build_image(target, tag=tag, **quiet)
        cold_s, cached_s = cold.seconds - cold.smoke_seconds, cached.seconds - cached.smoke_seconds
        return {"kind": kind, "arch": arch, "base_s": round(base_s, 1),
                "cold_s": round(cold_s, 1), "cached_s": round(cached_s, 1),
                "ratio": round(cached_s / cold_s, 3), "smoke_s": round(cold.smoke_seconds, 1),
                "steps": len(cold.steps), "cached_steps": cached.cached_steps,
                "size_mib": round(cold.size_bytes / 2**20)}
    finally:
        client = docker_client()
        for image in client.images.list(name=tag.split(":")[0]):
            client.images.remove(image.id, force=True, noprune=True)  # keep the layer cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", default="runtime,dev-env")
    parser.add_argument("--arches", default="amd64,arm64")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for arch in args.arches.split(","):
        for kind in args.kinds.split(","):
            rows.append(measure(kind, arch))
            print(f"# {rows[-1]}", file=sys.stderr, flush=True)
    report = {"bench": "images", "machine": f"{platform.machine()} {platform.node()}",
              "profile": PROFILE, "rows": rows}
    print_report(report, ["kind", "arch", "cold_s", "cached_s", "ratio", "smoke_s", "steps",
                          "cached_steps", "size_mib"], args.json)


if __name__ == "__main__":
    main()
