"""The OpenCL backend as a whole on PoCL's CPU device: whole-model logits and greedy tokens
against the numpy backend, the on-disk program cache, and what happens with no device."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("pyopencl")
pytest.importorskip("torch")
pytest.importorskip("transformers")

from gguf import GGMLQuantizationType as T

from runtime.backends.numpy_backend import NumpyBackend
from runtime.backends.opencl_backend import OpenCLBackend
from runtime.backends.opencl_programs import ProgramCache
from runtime.backends.opencl_tuning import default_params
from runtime.convert import convert
from runtime.model_file import open_model
from tests import opencl_checks as checks
from tests.agreement import assert_same_choices, assert_same_greedy
from tests.conftest import claw_subprocess
from tests.tiny_models import tiny_hf_model

pytestmark = pytest.mark.integration

VOCAB = 320
# (file type, per-tensor overrides): Q4_K_M-like files mix K-quants with Q6_K and Q8_0.
FILES = {
    "f16": (T.F16, {}),
    "q8_0": (T.Q8_0, {}),
    "q4_0": (T.Q4_0, {"ffn_down.weight": T.Q5_0, "attn_v.weight": T.Q4_1}),
    "q4_k_m": (T.Q4_K, {"ffn_down.weight": T.Q6_K, "attn_v.weight": T.Q5_K,
                        "token_embd.weight": T.Q8_0}),
}
# Logit tolerance (max |ours - numpy|, logits of magnitude ~0.5): the same weights are read by
# both, so only float32 summation order differs; files with quantized products also round their
# inputs to Q8_0, where that order can flip a rounding step (opencl_checks.INT8_LOGIT_TOL).
LOGIT_TOL = 1e-5
INT8_FILES = {"q8_0", "q4_0", "q4_k_m"}


@pytest.fixture(scope="module")
def device():
    return checks.cpu_device_or_skip()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for arch, extra in [("llama", {}), ("qwen2", {"tie_word_embeddings": True})]:
        hf = tmp_path_factory.mktemp(arch)
        tiny_hf_model(arch, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2,
                      **extra).save_pretrained(hf, safe_serialization=True)
        for name, (qtype, overrides) in FILES.items():
            out[f"{arch}-{name}"] = convert(hf, hf / f"{name}.gguf", qtype, overrides=overrides)
    return out


def greedy(backend, ids: list[int], n: int) -> list[int]:
    cache = backend.new_cache(len(ids) + n)
    logits = backend.forward(ids[:20], cache)
    logits = backend.forward(ids[20:], cache)  # prefill in two chunks
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits[-1])))
        logits = backend.forward([out[-1]], cache)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("name", FILES)
def test_whole_model_logits_and_greedy_tokens_match_numpy(models, device, arch, name):
    source = open_model(models[f"{arch}-{name}"])
    ours = OpenCLBackend(source, device=device)
    ref = NumpyBackend(source)
    ids = [int(t) for t in np.random.default_rng(1).integers(3, VOCAB, 150)]
    cache = ours.new_cache(len(ids))
    got = np.concatenate([ours.forward(ids[:100], cache, all_logits=True),
                          ours.forward(ids[100:], cache, all_logits=True)])
    want = ref.forward(ids, ref.new_cache(len(ids)), all_logits=True)
    int8 = name in INT8_FILES
    assert np.abs(got - want).max() <= (checks.int8_logit_bound(want) if int8 else LOGIT_TOL)
    if not int8:
        assert greedy(ours, ids[:40], 16) == greedy(ref, ids[:40], 16)
    else:  # identical but for a tie at rounding distance (tests/agreement.py)
        assert_same_choices(got, want)
        assert assert_same_greedy(ours, ref, ids[:40], 16, chunk=20) >= 8


def test_a_device_with_a_small_largest_buffer_splits_the_weights(models, device, monkeypatch):
    """Some Adreno/Mali drivers cap one buffer far below the memory size: tensors are split."""
    monkeypatch.setenv("CLAW_OPENCL_MAX_ALLOC", str(48 * 1024))
    source = open_model(models["llama-f16"])
    ours = OpenCLBackend(source, device=device)
    assert len(ours.embd.parts) > 1 and len(ours.layers[0]["ffn_up"].parts) > 1
    ids = [int(t) for t in np.random.default_rng(2).integers(3, VOCAB, 30)]
    ref = NumpyBackend(source)
    got = ours.forward(ids, ours.new_cache(len(ids)), all_logits=True)
    want = ref.forward(ids, ref.new_cache(len(ids)), all_logits=True)
    assert np.abs(got - want).max() <= LOGIT_TOL


def test_auto_says_which_backend_and_why(models):
    from runtime.backends import create_backend

    choice = create_backend("auto", open_model(models["llama-q8_0"]))
    assert choice.reason.startswith(f"auto: {choice.backend.name}")
    assert "ms on OpenCL vs" in choice.reason  # both probe timings are reported


def test_memory_in_use_counts_caches_until_they_are_released(models, device):
    backend = OpenCLBackend(open_model(models["llama-q8_0"]), device=device)
    backend.new_cache(256)  # RoPE tables for 256 positions stay; this cache goes at once
    before, total = backend.memory_in_use()
    assert 0 < before < total
    cache = backend.new_cache(256)
    cfg = backend.config
    grown = 2 * cfg.n_layers * 256 * cfg.n_kv_heads * cfg.head_dim * 4
    assert backend.memory_in_use()[0] == before + grown
    del cache
    assert backend.memory_in_use()[0] == before


def test_greedy_on_the_device_equals_argmax_of_the_logits(models, device):
    backend = OpenCLBackend(open_model(models["llama-q8_0"]), device=device)
    cache = backend.new_cache(16)
    logits = backend.forward([5, 6, 7], cache)
    assert backend.greedy_next() == int(np.argmax(logits[-1]))


@pytest.mark.parametrize("model", ["llama-q4_0", "qwen2-q4_k_m", "llama-f16"])
def test_replayed_decode_steps_equal_launching_each_kernel(models, device, model):
    """Decode steps replayed from a recording (opencl_replay) give bit-identical logits to the
    direct launches, across attention split counts (re-recorded), two caches taking turns, and
    per-step arguments (RoPE, the KV write offset, qwen2's K/V biases)."""
    import dataclasses

    source = open_model(models[model])
    params = dataclasses.replace(default_params(device), SPLIT=8)  # a new split every 8 keys
    runs = []
    for replay in (True, False):
        backend = OpenCLBackend(source, device=device, params=params)
        backend.replay = replay
        caches = [backend.new_cache(40), backend.new_cache(40)]
        backend.forward([3, 4, 5], caches[0])
        backend.forward([7, 8], caches[1])
        steps, recordings = [], []  # the recordings kept alive, so that each is counted once
        for t in range(30):
            cache = caches[t % 2]
            steps.append(backend.forward([10 + t], cache))
            if cache.recorded and not any(r is cache.recorded[1] for r in recordings):
                recordings.append(cache.recorded[1])
        runs.append((np.stack(steps), len(recordings)))
    (replayed, made), (direct, none) = runs
    assert np.array_equal(replayed, direct)
    # each cache crosses 3 split counts (1, 2, 3); a grown partials buffer re-records the other
    assert none == 0 and made >= 6


def test_warm_load_compiles_nothing_and_a_corrupt_entry_is_rebuilt(models, device, tmp_path):
    source = open_model(models["llama-q4_0"])
    params = default_params(device)
    first = ProgramCache(device, tmp_path)
    OpenCLBackend(source, device=device, params=params, programs=first)
    assert first.stats == {"compiled": 2, "loaded": 0, "rebuilt": 0}
    second = ProgramCache(device, tmp_path)
    OpenCLBackend(source, device=device, params=params, programs=second)
    assert second.stats == {"compiled": 0, "loaded": 2, "rebuilt": 0}

    entry = tmp_path / f"{second.key('ops', params.ops_defines())}.bin"
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the binary
    entry.write_bytes(bytes(data))
    third = ProgramCache(device, tmp_path)
    backend = OpenCLBackend(source, device=device, params=params, programs=third)
    assert third.stats == {"compiled": 1, "loaded": 1, "rebuilt": 1}
    cache = backend.new_cache(8)
    assert np.isfinite(backend.forward([1, 2, 3], cache)).all()
    fourth = ProgramCache(device, tmp_path)
    fourth.get("ops", params.ops_defines())
    assert fourth.stats == {"compiled": 0, "loaded": 1, "rebuilt": 0}


def test_tuned_parameters_are_stored_per_device_and_read_back(device, tmp_path, monkeypatch):
    from runtime.backends.opencl_kernels import Params
    from runtime.backends.opencl_tuning import load_params, save_params

    monkeypatch.setenv("CLAW_OPENCL_CACHE", str(tmp_path))
    assert load_params(device) == (default_params(device), "defaults")
    tuned = Params(LWS=4, RPW=4, TT=2, WG=32, SPLIT=64, UNALIGNED=1)
    path = save_params(device, tuned, {"trial": 1.0})
    assert load_params(device) == (tuned, str(path))
    path.write_text("{not json")  # a damaged file falls back to the defaults
    assert load_params(device) == (default_params(device), "defaults")


def test_an_unwritable_cache_directory_still_loads(models, device, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    programs = ProgramCache(device, blocked / "opencl")
    backend = OpenCLBackend(open_model(models["llama-q8_0"]), device=device,
                            params=default_params(device), programs=programs)
    assert programs.stats["compiled"] == 2 and "unwritable" in programs.stats
    assert np.isfinite(backend.forward([1, 2], backend.new_cache(4))).all()


def test_a_model_written_without_torch_runs_and_agrees(device, tmp_path):
    """The generator the gpu tier uses for its whole-model decode figure, checked here."""
    from tests.opencl_checks import decode_speed, random_gguf

    path = random_gguf(tmp_path / "r.gguf", T.Q4_0, dim=256, n_layers=2, ffn_dim=512,
                       n_heads=4, n_kv_heads=2, vocab_size=300)
    source = open_model(path)
    ours, ref = OpenCLBackend(source, device=device), NumpyBackend(source)
    got = ours.forward([5, 6, 7], ours.new_cache(4), all_logits=True)
    want = ref.forward([5, 6, 7], ref.new_cache(4), all_logits=True)
    assert np.abs(got - want).max() <= checks.int8_logit_bound(want)  # Q4_0: int8 activations
    assert np.abs(got[0] - want[0]).max() <= LOGIT_TOL  # the first token's path flips no step
    tps, gbs = decode_speed(ours, 4)
    assert tps > 0 and gbs > 0


NO_DEVICE = {"OCL_ICD_VENDORS": "/nonexistent"}


def test_no_device_auto_falls_back_to_numpy_and_opencl_is_a_clear_error(models):
    path = str(models["llama-q8_0"])
    done = claw_subprocess("runtime", "bench", path, "--backend", "opencl", "-p", "8", "-n", "2",
                           "-r", "1", env=NO_DEVICE)
    assert done.code == 1, done.err
    assert "--backend opencl: no OpenCL platform found" in done.err
    assert "Traceback" not in done.err
    done = claw_subprocess("runtime", "bench", path, "--backend", "auto", "-p", "8", "-n", "2",
                           "-r", "1", "--json", env=NO_DEVICE)
    assert done.code == 0, done.err
    report = json.loads(done.out)
    assert report["backend"] == "numpy"
    assert "auto: numpy (no OpenCL platform found" in report["backend_reason"]
