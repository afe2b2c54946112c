"""The memory planner, budget parsing, bounded attention and the CLI around --memory-budget."""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.errors import ModelError
from runtime.memory_plan import Rates, make_plan, measure_rates, parse_budget
from runtime.model_file import open_model
from tests.agreement import assert_same_choices, int8_logit_bound
from tests.stream_models import write_stream_model

pytestmark = pytest.mark.unit
RATES = Rates(memory=20e9, disk=1e9, dequant={"Q8_0": 5e9})


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_stream_model(tmp_path_factory.mktemp("plan") / "m.gguf", n_layers=6)


@pytest.mark.parametrize(("text", "value"), [
    ("300000", 300000), ("512M", 512 << 20), ("2G", 2 << 30), ("2g", 2 << 30),
    ("1.5GiB", 3 << 29), ("64 MB", 64 << 20), ("4k", 4096), ("100b", 100), (None, None)])
def test_budget_forms(text, value):
    assert parse_budget(text) == value


@pytest.mark.parametrize("text", ["", "12x", "M", "-5M", "0", "1.2.3G", "5 ib", "2GG"])
def test_malformed_budget_is_one_clear_error(text):
    with pytest.raises(ModelError, match=r"--memory-budget .* (is not a size|must be positive)"):
        parse_budget(text)


def test_tiers_follow_the_budget(model):
    src = open_model(model)
    base = make_plan(src, None, n_ctx=64, chunk=16, baseline=10 << 20, rates=RATES)
    assert {u.tier for u in base.units} == {"f32"}  # no budget: as before, all float32
    q_total = sum(u.quantized_bytes for u in base.units)
    f_total = sum(u.f32_bytes for u in base.units)

    def tiers(budget):
        plan = make_plan(src, budget, n_ctx=64, chunk=16, baseline=10 << 20, rates=RATES)
        assert plan.peak <= budget
        return [u.tier for u in plan.units], plan

    assert tiers(base.fixed + f_total)[0] == ["f32"] * 7
    assert tiers(base.fixed + q_total)[0] == ["quantized"] * 7  # blocks fit, float32 does not
    one_more = base.units[0].f32_bytes - base.units[0].quantized_bytes
    assert tiers(base.fixed + q_total + one_more)[0] == ["f32"] + ["quantized"] * 6
    least, plan = tiers(base.minimum)
    assert least == ["stream"] * 7
    two_layers, plan = tiers(base.minimum + 2 * base.units[0].quantized_bytes)
    assert two_layers == ["quantized"] * 2 + ["stream"] * 5  # kept in order while they fit
    head = base.units[-1].quantized_bytes
    two_and_head, plan = tiers(base.minimum + 2 * base.units[0].quantized_bytes + head)
    assert two_and_head == ["quantized"] * 2 + ["stream"] * 4 + ["quantized"]
    exp = plan.expected()
    streamed = sum(u.quantized_bytes for u in plan.units[2:6])
    assert exp["disk_s"] == pytest.approx(streamed / RATES.disk)
    assert exp["tokens_per_s"] == pytest.approx(1 / max(exp["disk_s"], exp["compute_s"]))
    assert "stream: blk.2-5" in plan.summary()


def test_budget_below_one_layer_names_the_minimum(model):
    src = open_model(model)
    least = make_plan(src, None, n_ctx=64, baseline=0).minimum
    with pytest.raises(ModelError, match=f"below the minimum .* expected ≥ {least} bytes"):
        make_plan(src, least - 1, n_ctx=64, baseline=0)


def test_streamed_and_blocked_attention_match_the_reference(model, monkeypatch):
    """Every unit streamed: the same logits, bit for bit. Attention split into blocks of 3
    queries as well: BLAS adds a block's scores in another order than the whole's (how, depends
    on the CPU's kernels), and this Q8_0 model rounds its activations to int8, so a rounding
    step may flip (tests/agreement.py): logits within that distance, choices the same."""
    import runtime.backends.numpy_backend as nb

    src = open_model(model)
    ids = [int(t) for t in np.random.default_rng(0).integers(3, 300, 30)]
    ref = nb.NumpyBackend(src)
    ref_cache = ref.new_cache(40)
    want = ref.forward(ids, ref_cache, all_logits=True)
    want_steps = np.array([ref.forward([t], ref_cache)[-1] for t in (5, 6, 7)])
    least = make_plan(src, None, n_ctx=40, chunk=30, baseline=0).minimum
    plan = make_plan(src, least, n_ctx=40, chunk=30, baseline=0)
    streamed = nb.NumpyBackend(src, plan=plan)
    assert np.array_equal(streamed.forward(ids, streamed.new_cache(40), all_logits=True), want)
    assert streamed.w.loads == 0 and streamed.w.reads > 0 and streamed.w.released > 0

    monkeypatch.setattr(nb, "ATTENTION_SCRATCH", 3 * 3 * 4 * 8 * 30)  # 3 rows of 8 heads × 30
    blocked = nb.NumpyBackend(src, plan=plan)
    cache = blocked.new_cache(40)
    got = blocked.forward(ids, cache, all_logits=True)
    got_steps = np.array([blocked.forward([t], cache)[-1] for t in (5, 6, 7)])
    for ours, theirs in ((got, want), (got_steps, want_steps)):
        assert np.abs(ours - theirs).max() <= int8_logit_bound(theirs)
        assert_same_choices(ours, theirs)

    # the blocking itself, with activations left in float32: rounding order only
    import runtime.backends.weight_stream as ws

    monkeypatch.setattr(ws, "q8_activations", lambda x: x)
    blocked_float = nb.NumpyBackend(src, plan=plan)
    got = blocked_float.forward(ids, blocked_float.new_cache(40), all_logits=True)
    monkeypatch.setattr(nb, "ATTENTION_SCRATCH", 1 << 30)
    whole_float = nb.NumpyBackend(src, plan=plan)
    want = whole_float.forward(ids, whole_float.new_cache(40), all_logits=True)
    assert np.abs(got - want).max() < 1e-5


def test_rates_are_measured_once_then_cached(model, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = measure_rates(open_model(model))
    assert not first.cached and first.memory > 0 and first.disk > 0 and first.dequant["Q8_0"] > 0
    again = measure_rates(open_model(model))
    assert again.cached and again.disk == first.disk
    assert (tmp_path / "clawforge" / "bandwidth.json").is_file()


def test_a_real_layer_step_is_timed_per_tier_and_drives_the_estimate(model, tmp_path,
                                                                      monkeypatch):
    """Kernel probes overestimated decode 3-4x: layers' estimates come from timed layer steps."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    src = open_model(model)
    rates = measure_rates(src)
    (kind, steps), = rates.layers.items()  # the test model's layers are all alike
    assert "Q8_0" in kind and set(steps) == {"f32", "quantized", "stream", "stream_disk"}
    assert all(v > 0 for v in steps.values())
    n = src.config.n_layers
    base = make_plan(src, None, n_ctx=64, chunk=16, baseline=10 << 20, rates=rates)
    head = base.units[-1]
    assert base.expected()["compute_s"] == pytest.approx(n * steps["f32"] + head.seconds["f32"])
    least = make_plan(src, base.minimum, n_ctx=64, chunk=16, baseline=10 << 20, rates=rates)
    exp = least.expected()
    assert exp["compute_s"] == pytest.approx(n * steps["stream"] + head.seconds["stream"])
    assert exp["disk_s"] == pytest.approx(n * steps["stream_disk"] + head.seconds_disk)
    assert measure_rates(src).cached
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "small"))
    small = measure_rates(src, budget=base.units[0].f32_bytes)  # no room for a float32 layer
    assert "f32" not in small.layers[kind] and small.layers[kind]["quantized"] > 0


def test_info_states_the_bounds_and_the_plan(claw, model, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    result = claw("runtime", "info", str(model), "--ctx", "64", "--json")
    plan = json.loads(result.out)["memory_plan"]
    assert plan["budget"] is None and plan["kv_cache"] == 2 * 6 * 64 * 4 * 32 * 4
    assert plan["attention_scratch"] > 0 and plan["activations"] > 0
    budget = plan["minimum_budget"] + (2 << 20)
    result = claw("runtime", "info", str(model), "--ctx", "64", "--memory-budget", str(budget))
    assert result.code == 0
    assert "KV cache" in result.out and "attention scratch" in result.out
    assert "stream units" in result.out and "expected decode" in result.out


@pytest.mark.parametrize(("budget", "message"), [
    ("lots", "--memory-budget 'lots' is not a size"),
    ("1M", "is below the minimum of"),
])
def test_bad_budget_on_the_cli_is_exit_2(claw, model, budget, message):
    result = claw("runtime", "generate", str(model), "-p", "the", "--ctx", "64",
                  "--memory-budget", budget)
    assert result.code == 2 and message in result.err
    assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err


@pytest.mark.parametrize("where", ["cli", "config"])
def test_serve_below_the_minimum_exits_2_at_start(claw, model, tmp_path, where, monkeypatch):
    """Not the server's generic "model failed to load" log line: the generate command's one."""
    import uvicorn

    started = []  # a regression starts the server: record it instead of serving forever
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: started.append(a))
    args = ["--memory-budget", "1M"]
    if where == "config":
        (tmp_path / "runtime.yaml").write_text(f"model: {model}\nmemory_budget: 1M\n")
        args = ["--config", str(tmp_path / "runtime.yaml")]
    result = claw("runtime", "serve", *([str(model)] if where == "cli" else []), *args,
                  "--port", "0")
    assert result.code == 2 and not started, result.out + result.err
    assert "--memory-budget 1.0 MiB is below the minimum of" in result.err
    assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err


def test_opencl_needs_its_own_plan_and_auto_streams_on_numpy(model):
    """A numpy plan (f32 tiers, host tiles) is not what the OpenCL backend runs: refused before
    any device is touched; auto under a streaming budget stays numpy and says why."""
    from runtime.backends import create_backend

    src = open_model(model)
    least = make_plan(src, None, n_ctx=64, baseline=0).minimum
    plan = make_plan(src, least, n_ctx=64, baseline=0)
    with pytest.raises(ModelError, match=r"was planned for numpy; expected a plan made with "
                       r"backend='opencl' for --backend opencl"):
        create_backend("opencl", src, plan=plan)
    choice = create_backend("auto", src, plan=plan)
    assert choice.backend.name == "numpy" and "streams layers" in choice.reason
    assert "--backend opencl streams through a ring of device buffers" in choice.reason


def test_the_opencl_plan_keeps_blocks_and_sizes_a_ring(model):
    """No f32 tier on OpenCL; the reserve is two slots of the largest unit plus the staging
    buffer, shrunk to the largest unit that does stream; every byte counted in the peak."""
    from runtime.memory_plan import RING_SLOTS, SLOT_ALIGN, STAGING_BYTES, slot_bytes

    src = open_model(model)
    base = make_plan(src, None, n_ctx=64, chunk=16, baseline=0, backend="opencl")
    largest = max(slot_bytes(u) for u in base.units)
    assert base.minimum == base.fixed + RING_SLOTS * largest + STAGING_BYTES
    assert base.tile_scratch == 0  # the device reads the blocks: no host tiles
    total = sum(u.quantized_bytes for u in base.units)
    roomy = make_plan(src, base.fixed + 10 * total, n_ctx=64, chunk=16, baseline=0,
                      backend="opencl")
    assert {u.tier for u in roomy.units} == {"quantized"} and roomy.ring is None
    half = make_plan(src, base.fixed + total - 1, n_ctx=64, chunk=16, baseline=0,
                     backend="opencl")  # one byte short of all resident
    streamed = [u for u in half.units if u.tier == "stream"]
    assert streamed and {u.tier for u in half.units} == {"quantized", "stream"}
    ring = half.ring
    assert ring["slots"] == RING_SLOTS and ring["staging_bytes"] == STAGING_BYTES
    assert ring["slot_bytes"] == max(slot_bytes(u) for u in streamed)
    assert ring["slot_bytes"] <= max(u.quantized_bytes for u in streamed) + 16 * SLOT_ALIGN
    assert half.stream_slots == RING_SLOTS * ring["slot_bytes"] + STAGING_BYTES
    assert half.peak <= half.budget and half.as_dict()["ring"] == ring
    assert "OpenCL ring 2 x" in half.summary()
    with pytest.raises(ModelError, match="is below the minimum of"):
        make_plan(src, base.minimum - 1, n_ctx=64, chunk=16, baseline=0, backend="opencl")


def test_a_streamed_batch_step_matches_one_by_one(model):
    """The server's batched decode under a streaming plan gives each sequence its own logits."""
    from runtime.backends.numpy_backend import NumpyBackend

    src = open_model(model)
    least = make_plan(src, None, n_ctx=16, chunk=8, baseline=0).minimum
    streamed = NumpyBackend(src, plan=make_plan(src, least, n_ctx=16, chunk=8, baseline=0))
    ref = NumpyBackend(src)
    caches, ref_caches = [streamed.new_cache(16) for _ in range(2)], []
    for c, prompt in zip(caches, ([4, 9, 30], [7, 8]), strict=True):
        streamed.forward(prompt, c)
        ref_caches.append(ref.new_cache(16))
        ref.forward(prompt, ref_caches[-1])
    got = streamed.forward_batch([11, 12], caches)
    want = np.concatenate([ref.forward([t], c) for t, c in zip([11, 12], ref_caches, strict=True)])
    assert np.abs(got - want).max() < 1e-5
