"""Every OpenCL kernel against its numpy counterpart on PoCL's CPU device (see
tests/opencl_checks.py for the tolerances). Programs come from the user's program cache, so a
warm run compiles nothing; the first run on a machine compiles both programs (~30 s)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
from gguf import GGMLQuantizationType as T

pytest.importorskip("pyopencl")


import numpy as np

from runtime.backends.opencl_kernels import (
    FILE,
    PLANAR,
    VNNI_TYPES,
    X8,
    X8_BLOCK_COLS,
    X8_HEADS,
    Kernels,
    interleave,
    planar,
)
from runtime.backends.opencl_programs import ProgramCache
from runtime.backends.opencl_tuning import default_params
from runtime.quant import row_bytes
from tests import opencl_checks as checks
from tests.conftest import REPO

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def kern():
    dev = checks.cpu_device_or_skip()
    return Kernels(dev, default_params(dev), ProgramCache(dev))


@pytest.mark.parametrize("qtype", checks.MATMUL_TYPES, ids=lambda t: t.name)
def test_matmul_decode_and_prefill_agree_with_numpy(kern, qtype):
    checks.check_matmul(kern, qtype, 1)
    checks.check_matmul(kern, qtype, 7)  # not a multiple of the token tile


@pytest.mark.parametrize("qtype", checks.MATMUL_TYPES, ids=lambda t: t.name)
def test_embedding_rows_are_bit_exact(kern, qtype):
    checks.check_get_rows(kern, qtype)


def test_int8_activations_round_exactly_as_numpy(kern):
    checks.check_q8_activations(kern)


def test_rms_norm_swiglu_bias(kern):
    checks.check_rms_norm(kern)
    checks.check_swiglu_and_bias(kern)


@pytest.mark.parametrize("style", ["normal", "neox"])
def test_rope(kern, style):
    checks.check_rope(kern, style)


@pytest.mark.parametrize("n_tok,pos0", [(1, 0), (1, 300), (9, 0), (5, 250)],
                         ids=["decode-first", "decode-3-splits", "prefill", "prefill-after-cache"])
def test_split_attention(kern, n_tok, pos0):
    checks.check_attention(kern, n_tok, pos0, split=True)
    # a Qwen2-0.5B head layout (14 query heads on 2 KV heads of 64), odd and even key counts
    checks.check_attention(kern, n_tok, pos0 + 1, heads=14, kv=2, d=64, split=True)
    checks.check_attention(kern, 1, 80, heads=4, kv=4, d=48, split=True)  # 16 | d, 32 does not


@pytest.mark.parametrize("n_tok,pos0", [(9, 0), (40, 0), (37, 250)],
                         ids=["one-tile", "tiles", "after-cache"])
def test_prefill_attention(kern, n_tok, pos0):
    """CPUs run rows of float16 where 16 divides head_dim (attn_prefill16), else of float4."""
    checks.check_attention(kern, n_tok, pos0, split=False)
    checks.check_attention(kern, n_tok, pos0, heads=14, kv=2, d=64, split=False)
    checks.check_attention(kern, n_tok, pos0, heads=4, kv=2, d=40, split=False)
    assert {"attn_prefill16", "attn_prefill"} <= set(kern._kernels)


def test_argmax_top_k_softmax(kern):
    checks.check_sampling(kern)


def test_weights_larger_than_the_device_allows_are_split(kern, monkeypatch):
    monkeypatch.setenv("CLAW_OPENCL_MAX_ALLOC", str(20 * 144))  # 20 rows of 256 Q4_0 weights
    checks.check_split_weights(kern)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q5_0, T.Q4_K, T.Q5_K, T.Q6_K],
                         ids=lambda t: t.name)
def test_prefill_tiles_agree_with_numpy_on_odd_shapes(kern, qtype):
    """Prefill's Q4_0/Q5_0/Q8_0/Q6_K kernels tile 8 rows x 8 tokens (qgemm8, on hosts with
    AVX-512 VNNI) or one row x 8 tokens (qgemm, every quantized type): rows below, off and on
    the row tile, token counts off and on the token tile, through both kernels where the host
    has both (Q4_K/Q5_K rows of whole groups of 8 are interleaved: see the x8 tests)."""
    for vnni in sorted({False, kern.vnni}):
        k = copy.copy(kern)  # the same programs, the other prefill kernel
        k.vnni = vnni
        for rows, n_tok in [(5, 3), (37, 7), (64, 8), (13, 17), (8, 40), (100, 2)]:
            checks.check_matmul(k, qtype, n_tok, rows=rows)
        if vnni and qtype in VNNI_TYPES:
            assert f"qgemm8_{qtype.name.lower()}" in k._kernels, "the VNNI kernel did not run"


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0], ids=lambda t: t.name)
def test_split_weights_prefill_tiles(kern, monkeypatch, qtype):
    """Parts of 10 (Q8_0) or 20 (Q4_0) rows: each part's last row tile is partial."""
    monkeypatch.setenv("CLAW_OPENCL_MAX_ALLOC", str(20 * 144))
    checks.check_split_weights(kern, qtype, (1, 3, 11))


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_0, T.Q8_0, T.Q4_K, T.Q5_K], ids=lambda t: t.name)
def test_interleave_moves_each_byte_where_the_kernels_read_it(qtype):
    """Group g, block c: the 8 rows' scales (Q4_K/Q5_K: their d, then their dmin), then chunk k's
    dword j = bytes 4k..4k+3 of row j's block after them."""
    qk, heads = X8_BLOCK_COLS.get(qtype, 32), X8_HEADS.get(qtype, 1)
    rows, cols, size = 16, 3 * qk, row_bytes(qtype, qk)
    nb, chunks, h = cols // qk, (size - 2 * heads) // 4, 2 * heads
    raw = np.random.default_rng(7).integers(0, 256, rows * nb * size, dtype=np.uint8)
    out = interleave(raw, qtype, rows, cols).reshape(rows // 8, nb, 8 * size)
    blocks = raw.reshape(rows, nb, size)
    for g, c, j in np.ndindex(rows // 8, nb, 8):
        row = blocks[8 * g + j, c]
        for i in range(heads):
            assert (out[g, c, 16 * i + 2 * j:16 * i + 2 * j + 2] == row[2 * i:2 * i + 2]).all()
        for k in range(chunks):
            at = 16 * heads + 32 * k + 4 * j
            assert (out[g, c, at:at + 4] == row[h + 4 * k:h + 4 + 4 * k]).all()
    assert out.nbytes == raw.nbytes


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_0, T.Q8_0, T.Q4_K, T.Q5_K],
                         ids=lambda t: t.name)
def test_interleaved_kernels_agree_with_numpy(kern, monkeypatch, qtype):
    """Where the device repacks X8_TYPES (AVX2 CPUs: matmul.cl's *_<type>x8), decode, prefill
    and embedding lookup (bit-exact) read the groups of 8 rows: rows of 1 to 8 groups, token
    counts off and on the tile, 1 to 16 blocks a row (Q4_K/Q5_K: 1 or 2 super-blocks), a
    matrix split into whole groups. Prefill through both kernels where the
    host has AVX-512 VNNI's 8 x 8 token tile."""
    if not kern.interleave:
        pytest.skip("this device has no interleaved kernels (AVX2 and F16C CPUs only)")
    name = qtype.name.lower()
    for vnni in sorted({False, kern.vnni}):
        k = copy.copy(kern)
        k.vnni = vnni
        for rows, n_tok, cols in [(8, 1, 32), (64, 1, 512), (40, 7, 256), (24, 8, 512),
                                  (48, 40, 256)]:
            cols = max(cols, X8_BLOCK_COLS.get(qtype, 32))
            checks.check_matmul(k, qtype, n_tok, rows=rows, cols=cols)
    checks.check_fused_decode(kern, qtype)
    checks.check_get_rows(kern, qtype)
    prefill = {"qgemm", "qgemm8"} if kern.vnni else {"qgemm"}
    assert {f"{k}_{name}x8" for k in {"qgemv", "qgemv_qkv", "qgemv_glu", "get_rows"} | prefill} \
        <= set(kern._kernels)
    monkeypatch.setenv("CLAW_OPENCL_MAX_ALLOC", str(20 * row_bytes(qtype, 256)))  # parts of 16
    raw, _ = checks.weights(qtype, 64, 256)
    split = kern.upload_matrix(raw, qtype, (64, 256))
    assert split.layout == X8 and [n for _, n, _ in split.parts] == [16] * 4
    for n_tok in (1, 9):
        checks.check_matmul(kern, qtype, n_tok, rows=64, cols=256)
    whole = kern.upload_matrix(raw, qtype, (64, 256), repack=False)
    assert whole.layout == FILE and len(whole.parts) == 4


def gpu_shaped(kern: Kernels) -> Kernels:
    """The GPU's default shape (LWS 32, vload8, no AVX2 kernels) on PoCL: what a GPU runs."""
    params = dataclasses.replace(default_params(kern.dev), LWS=32, RPW=4, TT=4, UNALIGNED=0,
                                 DP4A=1, QU=8, SHFL=1)
    return Kernels(kern.dev, params, ProgramCache(kern.dev))


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0], ids=lambda t: t.name)
def test_planar_moves_each_byte_where_the_kernels_read_it(qtype):
    """Row r: its blocks' quants in turn, then their scales, then zeros to a multiple of 16."""
    rows, cols, size = 5, 480, row_bytes(qtype, 32)  # 15 blocks: the stride needs padding
    nb, qb = cols // 32, size - 2
    raw = np.random.default_rng(8).integers(0, 256, rows * nb * size, dtype=np.uint8)
    stride = -(-nb * size // 16) * 16
    out = planar(raw, qtype, rows, cols).reshape(rows, stride)
    blocks = raw.reshape(rows, nb, size)
    for r, c in np.ndindex(rows, nb):
        assert (out[r, qb * c:qb * (c + 1)] == blocks[r, c, 2:]).all()
        assert (out[r, qb * nb + 2 * c:qb * nb + 2 * c + 2] == blocks[r, c, :2]).all()
    assert stride > nb * size and not out[:, nb * size:].any()


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0], ids=lambda t: t.name)
def test_planar_kernels_agree_with_numpy(kern, monkeypatch, qtype):
    """On the GPU shape, resident Q4_0/Q8_0 is in planes (matmul.cl's *p kernels): decode
    (rows of 1 to 296 blocks: the last not filling a round of a row's 32 work-items, or of
    their QU = 8 loads, or taking some whole rounds first), prefill and embedding lookup
    (bit-exact), and a matrix split by rows."""
    gpu = gpu_shaped(kern)
    for rows, n_tok, cols in [(8, 1, 32), (37, 1, 480), (64, 1, 1600), (6, 1, 9472),
                              (37, 7, 512), (20, 40, 256)]:
        checks.check_matmul(gpu, qtype, n_tok, rows=rows, cols=cols)
    checks.check_get_rows(gpu, qtype)
    name = qtype.name.lower()
    assert {f"qmatmul_{name}p_vec", f"qgemm_{name}p", f"get_rows_{name}p"} <= set(gpu._kernels)
    assert gpu.upload_matrix(*checks.weights(qtype, 8, 480)[:1], qtype, (8, 480)).layout == PLANAR
    monkeypatch.setenv("CLAW_OPENCL_MAX_ALLOC", str(20 * row_bytes(qtype, 256)))
    checks.check_split_weights(gpu, qtype)


@pytest.mark.parametrize(("qtype", "layout"), [(T.Q4_0, X8), (T.Q5_0, X8), (T.Q8_0, X8),
                                               (T.Q4_K, X8), (T.Q5_K, X8), (T.Q4_0, PLANAR),
                                               (T.Q8_0, PLANAR)],
                         ids=["Q4_0-x8", "Q5_0-x8", "Q8_0-x8", "Q4_K-x8", "Q5_K-x8",
                              "Q4_0-planar", "Q8_0-planar"])
def test_file_layout_gives_the_repacked_floats_exactly(kern, qtype, layout):
    """A streamed layer keeps the file's layout while a resident one is repacked (interleaved
    on AVX2 CPUs, in planes on GPUs): both add the same float terms in the same order, so a
    budgeted run's logits are the unbudgeted run's to the bit (decode, prefill on and off the
    token tile; the file layout's prefill through both kernels where the host has VNNI's)."""
    if layout == X8 and not kern.interleave:
        pytest.skip("this device has no interleaved kernels (AVX2 and F16C CPUs only)")
    kern = kern if layout == X8 else gpu_shaped(kern)
    raw, _ = checks.weights(qtype, 64, 512)
    x = checks.RNG.standard_normal((19, 512)).astype(np.float32)
    for vnni in sorted({False, kern.vnni}):
        k = copy.copy(kern)  # the same programs, the other prefill kernel for the file layout
        k.vnni = vnni
        outs = []
        for repack in (False, True):
            m = k.upload_matrix(raw, qtype, (64, 512), repack=repack)
            assert m.layout == (layout if repack else FILE)
            for n_tok in (1, 8, 19):
                y = k.empty(4 * n_tok * 64)
                k.matmul(m, k.upload(x[:n_tok]), y, n_tok)
                outs.append(k.read(y, (n_tok, 64)))
        for plain, repacked in zip(outs[:3], outs[3:], strict=True):
            assert np.array_equal(plain, repacked), f"vnni={vnni}"


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q5_0, T.Q4_K, T.Q6_K, T.F16],
                         ids=lambda t: t.name)
def test_fused_decode_launches_agree_with_numpy(kern, qtype):
    checks.check_fused_decode(kern, qtype)


@pytest.mark.parametrize("shape", [{"TT": 4}, {"LWS": 4, "RPW": 4, "TT": 2}, {"UNALIGNED": 0},
                                   {"LWS": 32, "RPW": 4, "TT": 4, "UNALIGNED": 0, "DP4A": 1,
                                    "QU": 8, "SHFL": 1}],
                         ids=["gemm-tile-4", "matmul-lws-4", "portable", "gpu-default"])
@pytest.mark.parametrize("qtype", [t for t in checks.MATMUL_TYPES if t not in (T.F32, T.F16)]
                         + [T.F16], ids=lambda t: t.name)
def test_every_tunable_matmul_shape_agrees_with_numpy(kern, shape, qtype):
    """`claw runtime tune` may pick a 4-token gemm tile, or the work-group matmul kernels (LWS > 1,
    the GPU shape): each must agree as the default shape does. UNALIGNED 0 compiles what a GPU
    runs: vload8, and for the quantized types the portable int8 or float block products
    instead of AVX2's.
    Q4_0/Q8_0 rows of 50 and 15 blocks too (on the GPU shape: halves of blocks that do not
    fill the last round of the 32 work-items of a row)."""
    params = dataclasses.replace(kern.params, **shape)
    other = Kernels(kern.dev, params, ProgramCache(kern.dev))
    checks.check_matmul(other, qtype, 1)
    checks.check_matmul(other, qtype, 7)
    if qtype in (T.Q8_0, T.Q4_0):
        checks.check_matmul(other, qtype, 1, cols=1600)
        checks.check_matmul(other, qtype, 1, cols=480)


def test_gemv_bandwidth_is_timed_on_the_device_clock(kern):
    """What bench/bench_gemv.py and the gpu tier report: weight bytes over the best launch's
    device time (event timestamps), and the copy probe's read + write bytes over its own."""
    import subprocess
    import sys

    import numpy as np

    from runtime.backends.opencl_device import copy_bandwidth
    from runtime.backends.opencl_tuning import gemv_bandwidth
    from runtime.quant import dequantize, quantize

    raw = quantize(np.random.default_rng(0).standard_normal((256, 512)).astype(np.float32),
                   T.Q4_0)
    for params in (kern.params, gpu_shaped(kern).params):  # interleaved, then in planes
        gbs, seconds, y, _ = gemv_bandwidth(kern.dev, params, ProgramCache(kern.dev), raw,
                                            T.Q4_0, (256, 512), repeats=3)
        assert 0 < seconds < 0.5 and gbs == pytest.approx(raw.nbytes / seconds)
        np.testing.assert_allclose(y, dequantize(raw, T.Q4_0, (256, 512)).sum(1), rtol=1e-4,
                                   atol=1e-4)  # x is all ones (exact in Q8_0)
    assert 1e8 < copy_bandwidth(kern.dev, kern.ops, 4 << 20, repeats=2) < 1e13
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_gemv.py"),
                           "--types", "q4_0,q9_9"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == ("bench_gemv: --types: unknown type Q9_9 "
                                   "(expected e.g. q8_0,q4_0)")
