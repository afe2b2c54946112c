"""A model twice the size of its memory cgroup generates the same tokens as without a limit.

The cgroup (v1, created under /sys/fs/cgroup/memory) is limited to half the model file's size;
the runtime is given a budget 10 % below that limit. `memory.failcnt == 0` then proves the
cgroup never had to reclaim or refuse a page for it: the runtime itself stayed within its
budget + 10 % (the usage counts page cache too, which streamed layers give back)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CLAW
from tests.stream_models import write_stream_model

pytestmark = pytest.mark.integration
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
ARGS = ["-p", "the edge of the claw", "-n", "8", "-t", "0", "--ctx", "128", "--backend",
        "numpy", "--json"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    # 40 layers of 6 MiB: 241 MiB, four times the CLI's own ~60 MiB of interpreter and libraries
    return write_stream_model(tmp_path_factory.mktemp("stream") / "stream-q8_0.gguf",
                              n_layers=40, dim=640, ffn_dim=2560, n_heads=8, n_kv_heads=2)


@pytest.fixture
def cgroup():
    if not os.access(CGROUP_ROOT, os.W_OK) or not (CGROUP_ROOT / "memory.failcnt").exists():
        pytest.skip(f"no writable cgroup v1 memory controller at {CGROUP_ROOT}")
    path = CGROUP_ROOT / f"claw-s5-budget-{os.getpid()}"
    path.mkdir()
    yield path
    path.rmdir()


PEAK_RSS = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
            "sys.exit(r.returncode)")


def run(args: list[str], cgroup: Path | None = None) -> tuple[dict, int]:
    """Run claw (in `cgroup` when given); return its JSON output and its peak RSS in bytes,
    reported by a wrapper process (outside the cgroup) whose only child is claw."""
    cmd = [str(CLAW), "runtime", "generate", *args]
    if cgroup is not None:
        cmd = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *cmd]
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, *cmd], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout), int(done.stderr.strip().splitlines()[-1]) * 1024


def test_half_the_model_size_gives_the_same_tokens(model, cgroup):
    size = model.stat().st_size
    limit = size // 2
    budget = limit * 10 // 11
    (cgroup / "memory.limit_in_bytes").write_text(str(limit))
    if (cgroup / "memory.memsw.limit_in_bytes").exists():  # no swapping out of the limit
        (cgroup / "memory.memsw.limit_in_bytes").write_text(str(limit))
    free, _ = run([str(model), *ARGS])
    fd = os.open(model, os.O_RDONLY)  # uncached: every page the run touches is charged to it
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    limited, rss = run([str(model), *ARGS, "--memory-budget", str(budget)], cgroup)

    assert limited["token_ids"] == free["token_ids"] and len(free["token_ids"]) == 8
    plan = limited["memory_plan"]
    assert plan["tiers"]["stream"] > 0 and plan["peak"] <= budget
    assert plan["weights_resident"] + plan["stream_slots"] < size / 4  # most of it streamed
    assert rss <= budget * 1.1, f"peak RSS {rss} past the budget {budget} + 10 %"
    peak = int((cgroup / "memory.max_usage_in_bytes").read_text())
    assert 0 < peak <= budget * 1.1
    assert int((cgroup / "memory.failcnt").read_text()) == 0, \
        f"the cgroup reached its limit {limit} (peak {peak})"
