"""The numpy reference against Hugging Face transformers on the same weights.

Tiny random-weight Llama and Qwen2 models (GQA, tied embeddings, Llama 3 and linear RoPE
scaling) are built with transformers, saved as safetensors, converted to GGUF in every
supported type, and run by our runtime. Quantized files are compared with transformers
running the weights that the gguf package's reference dequantizer reads from the same file.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as T  # noqa: E402

from runtime.backends.numpy_backend import NumpyBackend  # noqa: E402
from runtime.backends.weight_stream import Q8_ACTIVATION_TYPES  # noqa: E402
from runtime.convert import convert  # noqa: E402
from runtime.model_file import gguf_name, open_model  # noqa: E402
from tests.agreement import assert_same_choices  # noqa: E402
from tests.tiny_models import tiny_hf_model  # noqa: E402

pytestmark = pytest.mark.unit

VOCAB = 320
CONFIGS = {
    "llama-gqa": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama3-rope": ("llama", {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}, "rope_theta": 500000.0}),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),
}
QUANT_TYPES = [T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]


def build_hf(arch: str, extra: dict):
    return tiny_hf_model(arch, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, **extra)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    out = {}
    for name, (arch, extra) in CONFIGS.items():
        model = build_hf(arch, extra)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, safe_serialization=True)
        out[name] = (model, path)
    return out


def prompt(n: int = 48, seed: int = 1) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, VOCAB, n)]


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def our_logits(path, ids, **kw) -> np.ndarray:
    backend = NumpyBackend(open_model(path), **kw)
    return backend.forward(ids, backend.new_cache(len(ids)), all_logits=True)


@pytest.mark.parametrize("name", CONFIGS)
def test_safetensors_and_gguf_f32_match_transformers(hf_models, name, tmp_path):
    model, path = hf_models[name]
    ids = prompt()
    ref = hf_logits(model, ids)
    assert np.abs(our_logits(path, ids) - ref).max() <= 1e-4
    gguf_path = convert(path, tmp_path / "m.gguf", T.F32)
    assert np.abs(our_logits(gguf_path, ids) - ref).max() <= 1e-4


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (interleaved pairs back to HF's halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def load_reference_weights(model, gguf_path) -> None:
    """Put the gguf package's own dequantization of every tensor into the torch model."""
    reader = gguf.GGUFReader(gguf_path)
    by_name = {t.name: t for t in reader.tensors}
    cfg = model.config
    state = model.state_dict()
    with torch.no_grad():
        for hf_name, param in state.items():
            name = gguf_name(hf_name)
            if name is None or name not in by_name:
                continue
            t = by_name[name]
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(param.shape)
            if cfg.model_type == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = cfg.num_attention_heads if "attn_q" in name else cfg.num_key_value_heads
                w = _unpermute(w, heads)
            param.copy_(torch.from_numpy(np.array(w, dtype=np.float32)))  # a writable copy


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("name", ["llama-gqa", "qwen2"])
def test_quantized_gguf_matches_transformers_on_the_same_weights(hf_models, name, qtype,
                                                                 tmp_path):
    _, path = hf_models[name]
    gguf_path = convert(path, tmp_path / f"m-{qtype.name}.gguf", qtype)
    assert qtype.name in open_model(gguf_path).bytes_by_type()
    reference = build_hf(*CONFIGS[name])
    load_reference_weights(reference, gguf_path)
    ids = prompt()
    # Quantized products round activations to Q8_0 blocks (as llama.cpp does; transformers
    # multiplies float32): measured 3.5e-3..4.8e-3 here for every quantized type, against ~1e-1
    # for a wrong nibble/scale.
    tol = 1e-2 if qtype in Q8_ACTIVATION_TYPES else 1e-4
    assert np.abs(our_logits(gguf_path, ids) - hf_logits(reference, ids)).max() <= tol


def greedy(backend: NumpyBackend, ids: list[int], n: int, chunk: int) -> list[int]:
    cache = backend.new_cache(len(ids) + n)
    for i in range(0, len(ids), chunk):
        logits = backend.forward(ids[i:i + chunk], cache)
    out = []
    for _ in range(n):
        token = int(np.argmax(logits[-1]))
        out.append(token)
        logits = backend.forward([token], cache)
    return out


@pytest.mark.parametrize("name", ["llama-gqa", "llama3-rope", "qwen2"])
def test_greedy_continuation_equals_transformers_generate(hf_models, name, tmp_path):
    model, path = hf_models[name]
    ids = prompt(20)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    gguf_path = convert(path, tmp_path / "m.gguf", T.F32)
    assert greedy(NumpyBackend(open_model(gguf_path)), ids, 32, chunk=7) == ref


def test_chunked_prefill_and_weight_budget_change_nothing(hf_models, tmp_path):
    from runtime.memory_plan import make_plan

    _, path = hf_models["llama-gqa"]
    gguf_path = convert(path, tmp_path / "m.gguf", T.Q8_0)
    ids = prompt(40)
    whole = our_logits(gguf_path, ids)
    source = open_model(gguf_path)
    least = make_plan(source, None, n_ctx=len(ids), chunk=9, baseline=0).minimum
    plan = make_plan(source, least, n_ctx=len(ids), chunk=9, baseline=0)
    assert all(u.tier == "stream" for u in plan.units)  # the smallest budget streams everything
    backend = NumpyBackend(source, plan=plan)
    cache = backend.new_cache(len(ids))
    parts = [backend.forward(ids[i:i + 9], cache, all_logits=True) for i in range(0, 40, 9)]
    # Q8_0 products round their inputs: chunking's float-order changes can flip one rounding
    # step (see tests/opencl_checks.INT8_LOGIT_TOL); tokens differ only at such near-ties.
    got = np.concatenate(parts)
    assert np.abs(got - whole).max() <= 1e-2
    assert assert_same_choices(got, whole) <= 2
    assert backend.w.loads == 0  # no weight matrix was dequantized whole
    layer_bytes = sum(u.quantized_bytes for u in plan.units)
    assert backend.w.reads >= 4 * layer_bytes  # read ahead from disk on every chunk
    assert backend.w.released >= 4 * layer_bytes  # and given back


def test_sharded_safetensors_directory(hf_models, tmp_path):
    model, _ = hf_models["llama-gqa"]
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="300KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ids = prompt()
    assert np.abs(our_logits(tmp_path, ids) - hf_logits(model, ids)).max() <= 1e-4


def test_mixed_types_like_q4_k_m(hf_models, tmp_path):
    """Q4_K_M files keep some tensors in Q6_K and the embeddings higher: one file, many types."""
    _, path = hf_models["llama-gqa"]
    mixed = {"ffn_down.weight": T.Q6_K, "attn_v.weight": T.Q6_K, "token_embd.weight": T.Q8_0}
    gguf_path = convert(path, tmp_path / "m-q4_k_m.gguf", T.Q4_K, overrides=mixed)
    assert set(open_model(gguf_path).bytes_by_type()) == {"Q4_K", "Q6_K", "Q8_0", "F32"}
    reference = build_hf(*CONFIGS["llama-gqa"])
    load_reference_weights(reference, gguf_path)
    ids = prompt()
    # every product rounds its input to Q8_0 blocks: the tolerance of the quantized test above
    assert np.abs(our_logits(gguf_path, ids) - hf_logits(reference, ids)).max() <= 1e-2
