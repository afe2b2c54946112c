"""First provisioning vs re-provisioning, for fleets of 1, 3 and 10 emulated devices.

The peer of a run is the same fleet's first run, measured in the same process: the ratio
second/first is what a re-provision costs (the target is ≤ 0.30 with 0 changed), and the
per-device time shows how Ansible's forks spread a fleet over this machine's 2 cores.

    .venv/bin/python bench/bench_provision.py [--sizes 1,3,10] [--tags ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import print_report  # noqa: E402


def measure(n: int, tags: list[str] | None) -> dict:
    from provision import devices
    from provision.provisioning import provision

    fleet = f"bench{n}"
    devices.devices_down(fleet=fleet)
    inventory = devices.devices_up(n, "qemu-virt", "amd64", fleet=fleet, progress=lambda _: None)
    try:
        times, changed = [], []
        for _ in range(2):
            start = time.perf_counter()
            result, records = provision(inventory, tags=tags)
            times.append(time.perf_counter() - start)
            changed.append(sum(r["changed"] for r in records))
            if result.rc != 0:
                raise SystemExit(f"provisioning {n} devices failed: "
                                 f"{[r for r in records if r['status'] != 'ok']}")
        return {"devices": n, "first_s": round(times[0], 1), "second_s": round(times[1], 1),
                "ratio": round(times[1] / times[0], 3), "first_changed": changed[0],
                "second_changed": changed[1],
                "first_s_per_device": round(times[0] / n, 1)}
    finally:
        devices.devices_down(fleet=fleet)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,3,10")
    parser.add_argument("--tags", default="", help="comma-separated roles (default: all)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tags = [t for t in args.tags.split(",") if t] or None
    rows = []
    for n in args.sizes.split(","):
        rows.append(measure(int(n), tags))
        print(f"# measured: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    report = {"bench": "provision: first run vs re-run", "date": time.strftime("%Y-%m-%d"),
              "machine": platform.machine(), "cpus": os.cpu_count(), "tags": tags or "all",
              "rows": rows}
    head = ["devices", "first_s", "second_s", "ratio", "first_changed", "second_changed",
            "first_s_per_device"]
    print_report(report, head, args.json)


if __name__ == "__main__":
    main()
