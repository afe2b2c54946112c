"""Real memory pressure: the edge server runs in its own memory cgroup (v1 here; v2 is read
the same way) with a limit a little above what it uses; a second process in the same cgroup
allocates and touches memory until the server's own readings of the cgroup cross the
thresholds. Offload must start, critical work must stay local, and when the allocation goes
away the work must come back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytest.importorskip("torch")

from tests.integration.serve_helpers import start_server, wait_until
from tests.serve_model import tiny_chat_gguf

pytestmark = pytest.mark.integration

MEMCG = Path("/sys/fs/cgroup/memory")
MiB = 1 << 20


def cgroup_usage(cg: Path) -> int:
    stat = dict(line.split() for line in (cg / "memory.stat").read_text().splitlines())
    return int((cg / "memory.usage_in_bytes").read_text()) - int(stat["total_inactive_file"])


@pytest.fixture
def memcg():
    cg = MEMCG / f"claw-serve-test-{os.getpid()}"
    try:
        cg.mkdir()
    except OSError as exc:
        pytest.skip(f"no writable cgroup v1 memory controller at {MEMCG} ({exc.strerror})")
    yield cg
    for _ in range(50):
        try:
            cg.rmdir()
            break
        except OSError:
            import time

            time.sleep(0.1)


def test_real_cgroup_pressure_starts_and_stops_offload(tmp_path, memcg):
    model = tiny_chat_gguf(tmp_path / "model")
    cloud = start_server(tmp_path, {"model": str(model), "model_name": "cloud-tiny"},
                         name="cloud")
    enter = ["sh", "-c", f'echo $$ > {memcg}/cgroup.procs && exec "$@"', "sh"]
    edge = start_server(tmp_path, {
        "model": str(model), "model_name": "tiny",
        "offload": {"enabled": True, "url": cloud.v1, "model": "cloud-tiny",
                    "timeout_s": 10},
        "monitor": {"interval_s": 0.2, "hold_s": 0.5, "psi_some_avg10": 50.0,
                    "mem_available_min_fraction": 0.15, "cgroup_usage_max_fraction": 0.8}},
        name="edge", prefix=enter)
    hog = None
    try:
        assert str(edge.proc.pid) in (memcg / "cgroup.procs").read_text().split()
        ask = {"model": "tiny", "prompt": "pressure", "max_tokens": 3}
        assert httpx.post(edge.v1 + "/completions", json=ask, timeout=30) \
            .headers["x-claw-route"] == "local"
        used = cgroup_usage(memcg)
        limit = used + 300 * MiB
        (memcg / "memory.limit_in_bytes").write_text(str(limit))
        wait_until(lambda: edge.metric("claw_memory_bytes", signal="cgroup_limit") == limit)
        assert not httpx.get(edge.url + "/health").json()["pressure"]

        size = int(0.88 * limit) - used
        hog = subprocess.Popen(
            ["sh", "-c", f'echo $$ > {memcg}/cgroup.procs && exec "$@"', "sh", sys.executable,
             "-c", f"import sys, time; b = b'x' * {size}; print('ready', flush=True); "
             "time.sleep(120)"], stdout=subprocess.PIPE, text=True)
        assert hog.stdout.readline().strip() == "ready"
        wait_until(lambda: httpx.get(edge.url + "/health").json()["pressure"], timeout=15)
        assert edge.metric("claw_memory_fraction", signal="cgroup_usage_fraction") >= 0.8
        assert edge.metric("claw_memory_pressure") == 1

        normal = httpx.post(edge.v1 + "/completions", json=ask, timeout=30)
        assert normal.status_code == 200 and normal.headers["x-claw-route"] == "offload"
        critical = httpx.post(edge.v1 + "/completions", json={**ask, "priority": "critical"},
                              timeout=30)
        assert critical.status_code == 200 and critical.headers["x-claw-route"] == "local"
        assert "memory pressure started: " in edge.logs() and "cgroup usage" in edge.logs()

        hog.kill()
        hog.wait()
        hog = None
        wait_until(lambda: not httpx.get(edge.url + "/health").json()["pressure"], timeout=15)
        again = httpx.post(edge.v1 + "/completions", json=ask, timeout=30)
        assert again.status_code == 200 and again.headers["x-claw-route"] == "local"
        assert edge.metric("claw_offload_decisions_total", decision="offload") == 1
        assert "memory pressure cleared" in edge.logs()
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
        edge.stop()
        cloud.stop()
