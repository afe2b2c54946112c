"""`claw fleet rollout` wall time for fleets of 1, 5, 10 and 20 engine devices, tarball vs registry.

Per fleet size and delivery: a fresh rollout of release v1 (the whole numpy-only runtime image
goes to every device) and an upgrade to v2 (v1 plus one label: only a config blob differs; a
tarball still ships the whole image, a registry only what the device lacks). The peer is the
1-device rollout of the same release and delivery measured in the same run: t(N)/t(1) is what
a bigger fleet costs (the target for 20 devices is ≤ 3×).

One fleet of the largest size is started and provisioned once (not timed); a size N rolls out
to its first N devices (`--limit`), and before each v1 every device is reset to "provisioned,
no release" (service stopped, release record and every image removed) so v1 is a full delivery.
Batches: `--canary 1 --batch 100%` unless --batch says otherwise (batch size is a knob; the
default 25 % makes 1 + 4 batches of 20). Per-device phase times come from the rollout's own
progress callback (the time each device's phase was reported), CPU from /proc/stat.

    .venv/bin/python bench/bench_rollout.py [--sizes 1,5,10,20] [--delivery tar,registry]
        [--batch 100%] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import print_report  # noqa: E402

FLEET = "bench"
PREFIX = "claw-benchro/runtime"
PHASES = ("started", "delivered", "installed", "healthy", "committed")
# Back to "provisioned, no release yet": what a device is before its first rollout.
RESET = ("systemctl stop claw-release-guard.timer claw-runtime.service 2>/dev/null; "
         "rm -f /var/lib/clawforge/release/state.json /var/lib/clawforge/release/runtime.env; "
         "docker ps -aq | xargs -r docker rm -f >/dev/null; "
         "docker images -aq | sort -u | xargs -r docker rmi -f >/dev/null 2>&1; "
         "docker image prune -af >/dev/null; docker images -q | wc -l")


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def device_cpu_s(names: list[str]) -> float:
    """CPU seconds the device containers used (their sshd, Ansible's module Python, dockerd,
    docker load/pull), from cgroup v1 cpuacct; the runtime containers a device's own engine
    starts sit in cgroups of their own and are not counted here."""
    total = 0
    for name in names:
        cid = subprocess.run(["docker", "inspect", "-f", "{{.Id}}", name], capture_output=True,
                             text=True).stdout.strip()
        usage = Path(f"/sys/fs/cgroup/cpuacct/docker/{cid}/cpuacct.usage")
        total += int(usage.read_text()) if usage.is_file() else 0
    return total / 1e9


def controller_cpu_s() -> float:
    """CPU seconds of this process and its finished children (ansible-playbook, its forks and
    their ssh clients; ssh ControlPersist masters detach and are not counted)."""
    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def reset(names: list[str]) -> None:
    def one(name: str) -> None:
        done = subprocess.run(["docker", "exec", name, "sh", "-c", RESET], capture_output=True,
                              text=True, timeout=300)
        if done.stdout.strip() != "0":
            raise SystemExit(f"{name}: images left after the reset: {done.stdout} {done.stderr}")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, names))


def cleanup(releases: dict[str, str]) -> None:
    """This bench's exported tarballs and registry-named tags (the releases themselves stay:
    the next run builds on their cache)."""
    import contextlib

    from images.base import docker_client
    from provision.paths import state_dir

    client = docker_client()
    for tag in releases.values():
        with contextlib.suppress(Exception):
            image = client.images.get(tag)
            for path in (state_dir() / "images").glob(f"{image.id[7:23]}.tar.zst*"):
                path.unlink()
            for other in image.tags:
                if other != tag:
                    client.images.remove(other)


def build_releases() -> dict[str, str]:
    """The numpy-only runtime image as v1, and v2 = v1 plus one label."""
    from images.build import build_image
    from images.render import resolve
    from tests.fleet_images import release_image

    base = f"{PREFIX}:base"
    build_image(resolve("runtime", "qemu-virt", "amd64", "none"), tag=base,
                progress=lambda *_: None)
    releases = {"v1": f"{PREFIX}:v1", "v2": f"{PREFIX}:v2"}
    release_image(base, releases["v1"], "v1")
    release_image(releases["v1"], releases["v2"], "v2")
    return releases


def provisioned_fleet(n: int, model: Path) -> tuple[Path, list[str]]:
    """`n` engine devices provisioned for the runtime container (docker_engine, claw_runtime)."""
    from provision.provisioning import provision
    from tests.fleet_images import runtime_fleet

    inventory, group = runtime_fleet(n, FLEET, model)
    names = list(group["hosts"])
    result, records = provision(inventory, tags=["docker_engine", "claw_runtime"])
    if result.rc != 0:
        raise SystemExit(f"provisioning {n} devices failed: "
                         f"{[r for r in records if r['status'] != 'ok']}")
    return inventory, names


def phase_stats(seen: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Mean and max seconds per phase over the devices (from the time each phase was reported)."""
    out: dict[str, Any] = {}
    for a, b in itertools.pairwise(PHASES):
        spans = [t[b] - t[a] for t in seen.values() if a in t and b in t]
        if spans:
            out[f"{b}_mean_s"] = round(statistics.mean(spans), 1)
            out[f"{b}_max_s"] = round(max(spans), 1)
    return out


def timed_rollout(inventory: Path, names: list[str], image: str, registry: str,
                  batch: str) -> dict[str, Any]:
    from provision.fleet.plan import Settings
    from provision.fleet.rollout import rollout
    from provision.fleet.status import fleet_status

    # Untimed: the status a user reads before a rollout; it also leaves the SSH ControlPersist
    # connections open, so every size starts from the same warm connections.
    fleet_status(inventory, limit=",".join(names))
    seen: dict[str, dict[str, float]] = {}

    def on_change(devices: dict[str, dict[str, Any]]) -> None:
        now = time.time()
        for name, row in devices.items():
            seen.setdefault(name, {}).setdefault(row.get("phase", ""), now)

    busy0, total0 = cpu_ticks()
    dev0, ctl0 = device_cpu_s(names), controller_cpu_s()
    t0 = time.time()
    result = rollout(inventory, image, Settings(canary=1, batch=batch, registry=registry),
                     limit=",".join(names), on_change=on_change)
    wall = time.time() - t0
    busy1, total1 = cpu_ticks()
    dev1, ctl1 = device_cpu_s(names), controller_cpu_s()
    outcomes = sorted({d["outcome"] for d in result.devices})
    if result.status != "succeeded":
        raise SystemExit(f"rollout of {image} to {len(names)} devices {result.status}: "
                         f"{result.error} {[d for d in result.devices if d['outcome'] != 'ok']}")
    firsts = [t["started"] for t in seen.values() if "started" in t]
    lasts = [t["committed"] for t in seen.values() if "committed" in t]
    return {"wall_s": round(wall, 1), "outcomes": outcomes, "rollout_id": result.rollout_id,
            "to_first_start_s": round(min(firsts) - t0, 1) if firsts else None,
            "after_last_commit_s": round(t0 + wall - max(lasts), 1) if lasts else None,
            "cpu_busy_pct": round(100 * (busy1 - busy0) / max(total1 - total0, 1)),
            "controller_cpu_s": round(ctl1 - ctl0, 1), "devices_cpu_s": round(dev1 - dev0, 1),
            "machine_cpu_s": round((busy1 - busy0) / os.sysconf("SC_CLK_TCK"), 1),
            "load1": float(Path("/proc/loadavg").read_text().split()[0]),
            "deliveries": sorted({d["delivery"] for d in result.devices}),
            **phase_stats(seen)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,5,10,20")
    parser.add_argument("--delivery", default="tar,registry")
    parser.add_argument("--batch", default="100%", help="batch after the 1-device canary")
    parser.add_argument("--keep", action="store_true",
                        help="leave the fleet up afterwards (a later run re-provisions it, "
                        "which changes nothing, instead of starting it again)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sizes = sorted({int(n) for n in args.sizes.split(",")} | {1})  # 1 is every ratio's peer
    deliveries = [d for d in args.delivery.split(",") if d]
    if not set(deliveries) <= {"tar", "registry"}:
        raise SystemExit(f"--delivery {args.delivery!r}: expected tar and/or registry")

    from images.transfer import push_image
    from provision import devices
    from provision.fleet.rollout import local_image_id, tarball_for
    from tests.registry import local_registry
    from tests.serve_model import tiny_chat_gguf

    work = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    log = lambda msg: print(f"# {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)  # noqa: E731
    setup: dict[str, Any] = {}
    t = time.time()
    releases = build_releases()
    setup["build_releases_s"] = round(time.time() - t, 1)
    model = shutil.copy(tiny_chat_gguf(work / "tiny"), work / "chat.gguf")
    rows: list[dict[str, Any]] = []
    try:
        t = time.time()
        inventory, names = provisioned_fleet(max(sizes), Path(model))
        setup["fleet_up_and_provision_s"] = round(time.time() - t, 1)
        log(f"{len(names)} devices up and provisioned in {setup['fleet_up_and_provision_s']} s")
        with local_registry(work / "registry") as registry:
            for version, tag in releases.items():  # warm caches: timed runs reuse them
                t = time.time()
                tarball = tarball_for(tag, local_image_id(tag), lambda _: None)
                setup[f"export_{version}_s"] = round(time.time() - t, 1)
                setup[f"tarball_{version}_mb"] = round(tarball.stat().st_size / 1e6, 1)
                t = time.time()
                push_image(tag, registry)
                setup[f"push_{version}_s"] = round(time.time() - t, 1)
            log(f"setup: {json.dumps(setup)}")
            for n in sizes:
                for delivery in deliveries:
                    reset(names)
                    for version in ("v1", "v2"):
                        row = {"devices": n, "delivery": delivery, "release": version,
                               **timed_rollout(inventory, names[:n], releases[version],
                                               registry if delivery == "registry" else "",
                                               args.batch)}
                        rows.append(row)
                        log(f"measured: {json.dumps(row)}")
    finally:
        if not args.keep:
            devices.devices_down(fleet=FLEET)
        shutil.rmtree(work, ignore_errors=True)
        cleanup(releases)
    for row in rows:
        peer = next(r for r in rows if r["devices"] == 1 and r["delivery"] == row["delivery"]
                    and r["release"] == row["release"])
        row["ratio_to_1"] = round(row["wall_s"] / peer["wall_s"], 2)
        row["s_per_device"] = round(row["wall_s"] / row["devices"], 1)
    report = {"bench": "fleet rollout: wall time vs fleet size, tar vs registry",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": platform.machine(), "cpus": os.cpu_count(),
              "batches": f"canary 1, then {args.batch}", "setup": setup, "rows": rows}
    head = ["devices", "delivery", "release", "wall_s", "ratio_to_1", "to_first_start_s",
            "delivered_mean_s", "installed_mean_s", "healthy_mean_s", "healthy_max_s",
            "committed_mean_s", "controller_cpu_s", "devices_cpu_s", "machine_cpu_s"]
    for row in rows:
        for h in head:
            row.setdefault(h, None)
    print_report(report, head, args.json)


if __name__ == "__main__":
    main()
