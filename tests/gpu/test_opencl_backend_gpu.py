"""The OpenCL backend on a GPU (the `gpu` tier): the same kernel-by-kernel agreement checks
as on PoCL, whole-model agreement, and the quantized GEMV bandwidth target — at least 80 % of
the GPU's own measured copy bandwidth for a 4096 x 14336 matrix. Skipped where no non-CPU
OpenCL device exists."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

pytest.importorskip("pyopencl", reason="pyopencl is not installed")

from gguf import GGMLQuantizationType as T  # noqa: E402

from runtime.backends.opencl_device import NoDevice, copy_bandwidth, find_device  # noqa: E402
from runtime.backends.opencl_kernels import Kernels  # noqa: E402
from runtime.backends.opencl_programs import ProgramCache  # noqa: E402
from runtime.backends.opencl_tuning import gemv_bandwidth, load_params  # noqa: E402
from runtime.backends.weight_stream import Q8_ACTIVATION_TYPES  # noqa: E402
from runtime.quant import quantize  # noqa: E402
from tests import opencl_checks as checks  # noqa: E402
from tests.agreement import assert_same_choices  # noqa: E402


@pytest.fixture(scope="module")
def kern():
    try:
        dev = find_device(kind="gpu")
    except NoDevice as e:
        pytest.skip(f"no GPU OpenCL device on this machine ({e}); the gpu tier runs on the GPU "
                    "machine")
    return Kernels(dev, load_params(dev)[0], ProgramCache(dev))


@pytest.mark.parametrize("qtype", checks.MATMUL_TYPES, ids=lambda t: t.name)
def test_matmul_and_embedding_agree_with_numpy(kern, qtype):
    checks.check_matmul(kern, qtype, 1)
    checks.check_matmul(kern, qtype, 7)
    checks.check_get_rows(kern, qtype)
    if qtype in (T.Q8_0, T.Q4_0, T.Q4_K, T.F16):  # decode's Q/K/V and gate/up/SwiGLU launches
        checks.check_fused_decode(kern, qtype)


def test_the_other_kernels_agree_with_numpy(kern):
    checks.check_rms_norm(kern)
    checks.check_swiglu_and_bias(kern)
    checks.check_rope(kern, "normal")
    checks.check_rope(kern, "neox")
    for n_tok, pos0 in [(1, 0), (1, 700), (9, 0), (33, 250)]:
        checks.check_attention(kern, n_tok, pos0, split=True)
    for n_tok, pos0 in [(9, 0), (100, 0), (70, 250)]:
        checks.check_attention(kern, n_tok, pos0, split=False)
    checks.check_sampling(kern)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_quantized_gemv_reaches_80_percent_of_copy_bandwidth(kern, qtype):
    """Both sides on the device's event clock, each reading memory rather than the cache
    (see gemv_bandwidth); the copy moves 2 bytes (read + write) for each byte it copies."""
    rows, cols = 14336, 4096  # a Llama-3-8B FFN matrix, stored as 14336 rows of 4096
    raw = quantize(np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32),
                   qtype)
    achieved, seconds, _, _ = gemv_bandwidth(kern.dev, kern.params, ProgramCache(kern.dev), raw,
                                             qtype, (rows, cols))
    ceiling = copy_bandwidth(kern.dev, kern.ops, 1 << 30)
    print(f"{qtype.name} GEMV {rows}x{cols}: {seconds * 1e6:.1f} us, {achieved / 1e9:.1f} GB/s "
          f"of {ceiling / 1e9:.1f} GB/s copy ({achieved / ceiling:.0%})")
    assert achieved >= 0.8 * ceiling


@pytest.mark.parametrize("qtype", [T.F16, T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_whole_model_logits_and_greedy_tokens_agree_with_numpy(kern, qtype, tmp_path):
    from runtime.backends.numpy_backend import NumpyBackend
    from runtime.backends.opencl_backend import OpenCLBackend
    from runtime.model_file import open_model

    source = open_model(checks.random_gguf(tmp_path / "m.gguf", qtype, dim=512, n_layers=3,
                                           ffn_dim=1024, n_heads=8, n_kv_heads=2,
                                           vocab_size=500))
    ours, ref = OpenCLBackend(source, device=kern.dev), NumpyBackend(source)
    ids = [int(t) for t in np.random.default_rng(3).integers(0, 500, 90)]
    cache = ours.new_cache(100)
    got = np.concatenate([ours.forward(ids[:60], cache, all_logits=True),
                          ours.forward(ids[60:], cache, all_logits=True)])
    want = ref.forward(ids, ref.new_cache(100), all_logits=True)
    if qtype in Q8_ACTIVATION_TYPES:  # int8 activations: a rounding step may flip (see checks)
        assert np.abs(got - want).max() <= checks.int8_logit_bound(want)
        assert_same_choices(got, want)
    else:
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
        assert (got.argmax(axis=1) == want.argmax(axis=1)).mean() >= 0.99


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0], ids=lambda t: t.name)
def test_whole_model_decode_is_reported_beside_the_gemv(kern, qtype, tmp_path):
    """A ~1.5B Llama-shaped model (dim 2048, 16 layers, FFN 8192): decode tok/s and the
    bandwidth it implies, printed next to the GEMV figure (a report, with a sanity floor)."""
    from runtime.backends.opencl_backend import OpenCLBackend
    from runtime.model_file import open_model

    path = checks.random_gguf(tmp_path / "m.gguf", qtype, dim=2048, n_layers=16, ffn_dim=8192,
                              n_heads=16, n_kv_heads=8, vocab_size=32000)
    backend = OpenCLBackend(open_model(path), device=kern.dev)
    tps, gbs = checks.decode_speed(backend, 64)
    ceiling = copy_bandwidth(kern.dev, kern.ops, 1 << 30)
    print(f"{qtype.name} whole-model decode: {tps:.1f} tok/s, {gbs:.1f} GB/s of weights "
          f"({gbs * 1e9 / ceiling:.0%} of copy bandwidth)")
    assert tps > 1.0


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_K], ids=lambda t: t.name)
def test_streamed_layers_through_the_device_ring_give_the_same_logits(kern, qtype, tmp_path):
    """Under a budget that streams all but one layer (and the head), the ring of device
    buffers on a discrete GPU (sub-buffers at its own alignment, uploads on a second queue)
    gives the unbudgeted run's logits and greedy tokens."""
    from runtime.backends.opencl_backend import OpenCLBackend
    from runtime.memory_plan import make_plan
    from runtime.model_file import open_model

    source = open_model(checks.random_gguf(tmp_path / "m.gguf", qtype, dim=512, n_layers=4,
                                           ffn_dim=1024, n_heads=8, n_kv_heads=2,
                                           vocab_size=500))
    base = make_plan(source, None, n_ctx=64, chunk=16, baseline=0, backend="opencl")
    plan = make_plan(source, base.minimum + base.units[0].quantized_bytes, n_ctx=64, chunk=16,
                     baseline=0, backend="opencl")
    ours, ref = OpenCLBackend(source, device=kern.dev, plan=plan), \
        OpenCLBackend(source, device=kern.dev)
    assert ours.ring is not None and len(ours.streamed) >= 3
    ids = [int(t) for t in np.random.default_rng(5).integers(0, 500, 20)]
    outs = []
    for backend in (ours, ref):
        cache = backend.new_cache(64)
        logits = backend.forward(ids, cache, all_logits=True)
        tokens = []
        for _ in range(8):
            tokens.append(backend.greedy_next() if tokens else int(logits[-1].argmax()))
            backend.forward_device([tokens[-1]], cache)
        outs.append((logits, tokens))
    assert np.abs(outs[0][0] - outs[1][0]).max() <= 1e-5 * max(1.0, np.abs(outs[1][0]).max())
    assert outs[0][1] == outs[1][1]
    assert ours.ring.reads >= 8 * sum(plan.units[i].quantized_bytes for i in ours.streamed)
