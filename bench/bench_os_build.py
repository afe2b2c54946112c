"""`claw os build qemu-virt`: a cold build (empty root caches) against a cached one, in the
same run. The cold build makes the base root (debootstrap + kernel under qemu-user) and the
provisioned root (the roles through the chroot connection); the cached build reuses both and
only copies the root, writes the first-boot settings and the disk image, maps and hashes it.
`ratio` = cold_s / cached_s.

    .venv/bin/python bench/bench_os_build.py [--state DIR] [--size 4G] [--json]

--state names the state directory whose caches count as cold (default: a fresh temporary one,
removed afterwards); pass an existing one to time only what is not cached there yet.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import print_report  # noqa: E402

CLAW = Path(sys.executable).parent / "claw"


def build(state: Path, out: Path, size: str) -> dict:
    env = {**os.environ, "XDG_STATE_HOME": str(state), "COLUMNS": "200"}
    started = time.monotonic()
    done = subprocess.run([str(CLAW), "os", "build", "qemu-virt", "-o", str(out), "--size", size,
                           "--hostname", "bench", "--json"], capture_output=True, text=True,
                          env=env, timeout=7200)
    if done.returncode != 0:
        sys.exit(f"claw os build failed: {done.stderr.strip()[-2000:]}")
    record = json.loads(done.stdout)
    record["wall_s"] = round(time.monotonic() - started, 1)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state", type=Path, help="state directory (default: a fresh one)")
    parser.add_argument("--size", default="4G")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    state = args.state or Path(tempfile.mkdtemp(prefix="claw-bench-os-"))
    out = Path(tempfile.mkdtemp(prefix="claw-bench-os-out-"))
    try:
        cold = build(state, out / "cold.img", args.size)
        cached = build(state, out / "cached.img", args.size)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if args.state is None:
            shutil.rmtree(state, ignore_errors=True)
    rows = [{"build": name, "wall_s": r["wall_s"],
             "root_s": r["steps"].get(next(k for k in r["steps"] if k.startswith("root")), 0),
             "image_s": round(r["wall_s"] - r["steps"][next(k for k in r["steps"]
                                                            if k.startswith("root"))], 1)}
            for name, r in (("cold", cold), ("cached", cached))]
    report = {"bench": "os_build", "machine": f"{platform.machine()} {os.cpu_count()} cores",
              "load_avg": os.getloadavg()[0], "size": args.size, "rows": rows,
              "ratio": round(cold["wall_s"] / cached["wall_s"], 1),
              "steps": {"cold": cold["steps"], "cached": cached["steps"]}}
    print_report(report, ["build", "wall_s", "root_s", "image_s"], args.json)
    if not args.json:
        print(f"cold/cached: {report['ratio']}x")


if __name__ == "__main__":
    main()
