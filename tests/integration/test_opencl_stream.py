"""The OpenCL backend under a memory budget on PoCL's CPU device: streamed layers go through a
ring of device buffers and give the unbudgeted run's logits and greedy tokens, in process and
through `claw runtime generate` in a memory cgroup of half the model's size."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyopencl")

from runtime.backends.opencl_backend import OpenCLBackend
from runtime.memory_plan import make_plan, slot_bytes
from runtime.model_file import open_model
from tests import opencl_checks as checks
from tests.integration.test_memory_budget import run
from tests.stream_models import write_stream_model

pytestmark = pytest.mark.integration
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
PROMPT = [1, 17, 40, 99, 5]


@pytest.fixture(scope="module")
def device():
    return checks.cpu_device_or_skip()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_stream_model(tmp_path_factory.mktemp("ocl-stream") / "m.gguf", n_layers=6,
                              dim=512, ffn_dim=1536, n_heads=8, n_kv_heads=4)


def greedy(backend: OpenCLBackend, n: int = 6) -> tuple[list[int], np.ndarray]:
    """Greedy tokens after PROMPT (prefill in two chunks), and the prompt's logits."""
    cache = backend.new_cache(32)
    backend.forward(PROMPT[:2], cache)
    logits = backend.forward(PROMPT[2:], cache, all_logits=True)
    ids = []
    for _ in range(n):
        ids.append(backend.greedy_next())
        backend.forward_device([ids[-1]], cache)
    return ids, logits


@pytest.mark.parametrize("resident", [0, 1, 3])
def test_streamed_layers_give_the_unbudgeted_tokens(model, device, resident):
    """`resident` layers fit beside the ring, the rest (and the head) stream."""
    src = open_model(model)
    want_ids, want_logits = greedy(OpenCLBackend(src, device=device))
    base = make_plan(src, None, n_ctx=32, chunk=8, baseline=0, backend="opencl")
    budget = base.minimum + sum(u.quantized_bytes for u in base.units[:resident])
    plan = make_plan(src, budget, n_ctx=32, chunk=8, baseline=0, backend="opencl")
    backend = OpenCLBackend(src, device=device, plan=plan)
    streamed = [i for i, u in enumerate(plan.units) if u.tier == "stream"]
    assert len(streamed) == len(plan.units) - resident and backend.streamed == set(streamed)
    ids, logits = greedy(backend)
    assert ids == want_ids
    assert np.abs(logits - want_logits).max() <= 1e-6
    ring = backend.ring
    assert len(ring.slots) == 2 and ring.slot_bytes <= plan.ring_slot_bytes
    assert ring.slot_bytes >= max(slot_bytes(plan.units[i]) for i in streamed) - 16 * 512
    passes = 2 + 6  # two prefill chunks, six decode steps (the last one's upload may run on)
    per_pass = sum(plan.units[i].quantized_bytes for i in streamed)
    assert (passes - 1) * per_pass <= ring.reads <= (passes + 1) * per_pass
    held, _ = backend.memory_in_use()
    assert held >= ring.nbytes
    assert backend.describe()["ring"]["streamed_units"] == len(streamed)
    ring.close()


def test_a_streamed_tied_head_and_host_embedding_rows(device, tmp_path):
    """Tied embeddings: the head is the embedding table; streamed, rows come from the host."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from gguf import GGMLQuantizationType as T

    from runtime.convert import convert
    from tests.tiny_models import tiny_hf_model

    tiny_hf_model("qwen2", vocab_size=320, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=True).save_pretrained(tmp_path, safe_serialization=True)
    src = open_model(convert(tmp_path, tmp_path / "q8.gguf", T.Q8_0))
    want = greedy(OpenCLBackend(src, device=device))
    least = make_plan(src, None, n_ctx=32, chunk=8, baseline=0, backend="opencl").minimum
    plan = make_plan(src, least, n_ctx=32, chunk=8, baseline=0, backend="opencl")
    for u in plan.units[1:]:  # the model is smaller than the ring: stream all but layer 0
        u.tier = "stream"
    plan.ring_slot_bytes = max(slot_bytes(u) for u in plan.units)
    backend = OpenCLBackend(src, device=device, plan=plan)
    assert plan.units[-1].tier == "stream" and backend.head is None and backend.embd is None
    ids, logits = greedy(backend)
    assert ids == want[0] and np.abs(logits - want[1]).max() <= 1e-5


@pytest.fixture
def cgroup():
    if not os.access(CGROUP_ROOT, os.W_OK) or not (CGROUP_ROOT / "memory.failcnt").exists():
        pytest.skip(f"no writable cgroup v1 memory controller at {CGROUP_ROOT}")
    path = CGROUP_ROOT / f"claw-s6-ocl-stream-{os.getpid()}"
    path.mkdir()
    yield path
    path.rmdir()


def test_half_the_model_size_in_a_cgroup_on_opencl(device, cgroup, tmp_path):
    """`claw runtime generate --backend opencl` in a cgroup limited to half the model file:
    the unlimited run's tokens, peak ≤ budget + 10 %, and the cgroup never hit its limit."""
    # 60 layers of 6 MiB (~360 MiB): half of it holds PoCL's ~100 MiB process and a few layers
    path = write_stream_model(tmp_path / "big.gguf", n_layers=60, dim=640, ffn_dim=2560,
                              n_heads=8, n_kv_heads=2)
    size = path.stat().st_size
    limit = size // 2
    budget = limit * 10 // 11
    (cgroup / "memory.limit_in_bytes").write_text(str(limit))
    if (cgroup / "memory.memsw.limit_in_bytes").exists():
        (cgroup / "memory.memsw.limit_in_bytes").write_text(str(limit))
    args = ["-p", "the edge of the claw", "-n", "6", "-t", "0", "--ctx", "64", "--backend",
            "opencl", "--json"]
    free, _ = run([str(path), *args])
    fd = os.open(path, os.O_RDONLY)  # uncached: every page the run touches is charged to it
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    limited, rss = run([str(path), *args, "--memory-budget", str(budget)], cgroup)

    assert limited["token_ids"] == free["token_ids"] and len(free["token_ids"]) == 6
    assert limited["backend"] == "opencl" and "ring of 2 slots" in limited["backend_reason"]
    plan = limited["memory_plan"]
    assert plan["backend"] == "opencl" and plan["tiers"]["stream"] > 0
    assert plan["tiers"]["f32"] == 0 and plan["peak"] <= budget
    assert plan["ring"]["slots"] == 2 and plan["ring"]["slot_bytes"] < 8 << 20
    assert rss <= budget * 1.1, f"peak RSS {rss} past the budget {budget} + 10 %"
    peak = int((cgroup / "memory.max_usage_in_bytes").read_text())
    assert 0 < peak <= budget * 1.1
    assert int((cgroup / "memory.failcnt").read_text()) == 0, \
        f"the cgroup reached its limit {limit} (peak {peak})"


def test_info_states_the_opencl_ring(device, model):
    """`claw runtime info --backend opencl --memory-budget` says which units stream and the
    ring they go through; a budget under the OpenCL minimum names it, in one line."""
    from tests.conftest import claw_subprocess

    src = open_model(model)
    total = sum(u.quantized_bytes for u in make_plan(src, None, n_ctx=64).units)
    least = claw_subprocess("runtime", "info", str(model), "--backend", "opencl", "--ctx", "64",
                            "--memory-budget", "1M")
    assert least.code == 2 and "an OpenCL ring of 2 slots and staging" in least.err, least.err
    assert len(least.err.strip().splitlines()) == 1
    minimum = int(least.err.split("expected ≥ ")[1].split()[0])
    budget = str(minimum + total // 3)
    done = claw_subprocess("runtime", "info", str(model), "--backend", "opencl", "--ctx", "64",
                           "--memory-budget", budget, "--json")
    assert done.code == 0, done.err
    plan = json.loads(done.out)["memory_plan"]
    assert plan["backend"] == "opencl" and plan["tiers"]["stream"] > 0
    assert plan["ring"]["slots"] == 2 and plan["ring"]["slot_bytes"] > 3 << 20
    assert plan["stream_slots"] == 2 * plan["ring"]["slot_bytes"] + plan["ring"]["staging_bytes"]
    table = claw_subprocess("runtime", "info", str(model), "--backend", "opencl", "--ctx", "64",
                            "--memory-budget", budget)
    assert table.code == 0 and "OpenCL ring" in table.out and "2 device buffers of" in table.out
    bad = claw_subprocess("runtime", "info", str(model), "--backend", "cuda")
    assert bad.code == 2 and "--backend 'cuda': expected numpy or opencl" in bad.err
