"""Mixed-precision quantization and llama-perplexity-style evaluation on small models: the
knapsack against brute force, the CLI's plan against its size target, the written GGUF loaded
back, perplexity's windows and scoring, and bad input as one line."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from runtime.mixed_quant import TensorPlan, _hull, candidate_types, choose
from runtime.perplexity import paired_log_ratio, perplexity, windows

pytestmark = pytest.mark.unit


def random_plans(seed: int, n: int) -> list[TensorPlan]:
    """Tensors whose losses fall with size but noisily (non-convex, some dominated)."""
    rng = np.random.default_rng(seed)
    plans = []
    for i in range(n):
        options = candidate_types((256 * int(rng.integers(1, 4)), 256))
        p = TensorPlan(f"t{i}", (1, 1), options)
        scale = rng.uniform(0.1, 10)
        for q, nbytes in options.items():
            p.loss[q] = scale * (options[T.F16] / nbytes - 1) ** 2 * rng.uniform(0.5, 1.5)
        plans.append(p)
    return plans


def test_candidate_types_respect_block_sizes():
    assert set(candidate_types((64, 512))) == {T.F16, T.Q8_0, T.Q6_K, T.Q5_K, T.Q4_K, T.Q4_0}
    assert set(candidate_types((64, 96))) == {T.F16, T.Q8_0, T.Q4_0}  # no K-quant: 96 % 256
    assert set(candidate_types((64, 50))) == {T.F16}
    assert candidate_types((64,)) == {}
    assert candidate_types((10, 256))[T.Q4_K] == 10 * 144


def test_hull_steps_cost_more_loss_per_byte_each_time():
    for p in random_plans(1, 30):
        hull = _hull(p)
        sizes = [p.options[q] for q in hull]
        losses = [p.loss[q] for q in hull]
        assert sizes == sorted(sizes, reverse=True) and losses == sorted(losses)
        assert sizes[-1] == min(p.options.values())  # the smallest size stays reachable
        slopes = [(losses[i + 1] - losses[i]) / (sizes[i] - sizes[i + 1])
                  for i in range(len(hull) - 1)]
        assert slopes == sorted(slopes)


@pytest.mark.parametrize("seed", range(6))
def test_choice_meets_the_budget_near_the_brute_force_optimum(seed):
    plans = random_plans(seed, 4)
    smallest = sum(min(p.options.values()) for p in plans)
    largest = sum(max(p.options.values()) for p in plans)
    budget = int(smallest + (largest - smallest) * (0.15 + 0.12 * seed))
    choose(plans, budget)
    used = sum(p.options[p.choice] for p in plans)
    ours = sum(p.loss[p.choice] for p in plans)
    assert used <= budget
    best = min(sum(p.loss[q] for p, q in zip(plans, combo, strict=True))
               for combo in itertools.product(*(p.options for p in plans))
               if sum(p.options[q] for p, q in zip(plans, combo, strict=True)) <= budget)
    assert ours <= best * 1.5 + 1e-9, (ours, best)  # greedy on hulls: near, not always exact


def test_perplexity_windows_and_scored_half_like_llama_perplexity():
    ids = list(range(3, 3 + 70))
    wins = windows(ids, 32, bos=1)
    assert len(wins) == 2 and wins[0][0] == 1 and wins[1][0] == 1 and wins[1][1:] == ids[33:64]
    vocab = 80
    seen = []

    def uniform(w):  # every token equally likely: perplexity is the vocabulary size
        seen.append(list(w))
        return np.zeros((len(w), vocab), np.float32)

    r = perplexity(uniform, ids, 32, 1, base_logits_of=uniform)
    assert r.windows == 2 and r.tokens_scored == 2 * (32 - 1 - 16)
    assert r.ppl == pytest.approx(vocab) and r.kl_mean == pytest.approx(0) and r.top1_agree == 1

    def sure(w):  # certain of the right next token: perplexity 1
        out = np.full((len(w), vocab), -1e4, np.float32)
        out[np.arange(len(w) - 1), w[1:]] = 0
        return out

    assert perplexity(sure, ids, 32, 1).ppl == pytest.approx(1.0)


def test_paired_log_ratio_of_two_evaluations_of_the_same_tokens():
    """ln(ppl_a / ppl_b) from per-token NLLs, with the standard error of their differences:
    a constant shift has no error; the per-token NLLs stay out of the JSON dict."""
    ids, vocab = list(range(3, 3 + 70)), 80
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((70, vocab)).astype(np.float32)

    def a(w):
        return noise[: len(w)]

    def b(w):  # every logit of the right token 0.1 higher: each NLL drops by nearly 0.1
        out = noise[: len(w)].copy()
        out[np.arange(len(w) - 1), w[1:]] += 0.1
        return out

    ra, rb = perplexity(a, ids, 32, 1), perplexity(b, ids, 32, 1)
    log_ratio, err = paired_log_ratio(ra, rb)
    assert log_ratio == pytest.approx(np.log(ra.ppl / rb.ppl)) and 0.05 < log_ratio < 0.1
    assert 0 < err < 0.01
    assert paired_log_ratio(ra, ra) == (0.0, 0.0)
    assert "token_nll" not in ra.as_dict() and len(ra.token_nll) == ra.tokens_scored
    with pytest.raises(ValueError):
        paired_log_ratio(ra, perplexity(a, ids[:40], 32, 1))


# ------------------------------------------------------------------ through the CLI

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    pytest.importorskip("torch")
    from runtime.convert import convert, tokenizer_metadata
    from tests.tiny_models import tiny_hf_model
    from tests.unit import tokenizer_fixtures as fx

    tok = fx.train_byte_level("qwen2")
    folder = tmp_path_factory.mktemp("hf")
    fx.save(tok, folder, {"eos_token": "<|endoftext|>"})
    model = tiny_hf_model(vocab_size=tok.get_vocab_size(with_added_tokens=True), seed=5,
                          num_hidden_layers=1)  # one layer: the sensitivity runs stay quick
    model.save_pretrained(folder, safe_serialization=True)
    out = tmp_path_factory.mktemp("gguf")
    meta = tokenizer_metadata(folder)
    files = {t: convert(folder, out / f"m-{t.name}.gguf", t, tokenizer_metadata=meta)
             for t in (T.F16, T.Q8_0)}
    text = out / "calibration.txt"
    text.write_text(" ".join(fx.TRAIN_CORPUS)[:2500], encoding="utf-8")
    return folder, files, text


def test_quantize_meets_the_bpw_target_and_writes_a_gguf_we_load(models, tmp_path, claw):
    from runtime.api import Model
    from runtime.model_file import open_model

    folder, files, text = models
    out = tmp_path / "mixed.gguf"
    r = claw("runtime", "quantize", str(files[T.F16]), str(out), "--target-bpw", "6",
             "--calibration", str(text), "--calibration-tokens", "32", "--json")
    assert r.code == 0, r.err
    plan = json.loads(r.out)
    assert plan["bpw"] <= 6 and plan["bpw"] > 5  # spends the budget, does not exceed it
    # the importance matrix averages over all the calibration text, not the 32 tokens of the
    # sensitivity runs
    assert plan["imatrix"] is True and plan["imatrix_source"].startswith("calibration.txt, ")
    assert plan["gptq"] is True and plan["gptq_note"] == ""  # the calibrated default
    assert int(plan["imatrix_source"].split(", ")[1].split()[0]) > 32
    src = open_model(out)
    assert src.metadata["quantize.imatrix.dataset"] == "calibration.txt"
    assert out.stat().st_size == plan["file_bytes"]  # the plan knows the file's size exactly
    tensor_bytes = sum(ref.nbytes for ref in src.tensors.values())
    assert tensor_bytes == plan["tensor_bytes"]
    for t in plan["tensors"]:
        assert src.tensors[t["name"]].qtype.name == t["type"]
        assert set(t["kl_by_type"]) == {"F16", "Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q4_0"}
    assert len({t["type"] for t in plan["tensors"]}) > 1  # mixed, not one type
    assert src.tensors["blk.0.attn_norm.weight"].qtype == T.F32
    ours, ref = Model(out, backend="numpy"), Model(files[T.F16], backend="numpy")
    ids = ref.tokenize("the quick brown fox")
    assert ours.tokenize("the quick brown fox") == ids
    a, b = ours.logits(ids), ref.logits(ids)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99

    # a Hugging Face directory and --max-bytes, plan only: nothing written
    r = claw("runtime", "quantize", str(folder), str(tmp_path / "no.gguf"), "--max-bytes",
             str(out.stat().st_size), "--calibration", str(text), "--calibration-tokens", "32",
             "--plan-only", "--no-imatrix")
    assert r.code == 0, r.err
    assert "bits/weight" in r.out and "blk.0.ffn_down.weight" in r.out
    assert "importance matrix: none" in r.out and "levels: nearest, --no-imatrix" in r.out
    assert not (tmp_path / "no.gguf").exists()

    r = claw("runtime", "eval", str(out), "--text", str(text), "--base", str(files[T.F16]),
             "--ctx", "64", "--json")
    assert r.code == 0, r.err
    ev = json.loads(r.out)
    assert ev["windows"] >= 1 and ev["ppl"] > 1 and 0 <= ev["kl_mean"] < 0.5


def test_importance_matrix_is_the_mean_square_of_the_real_activations(models, tmp_path):
    """The recorded importance of the first attention projections is the mean squared entry of
    their real input (the normed embeddings, computed here by hand), the three share it, and a
    column fed 10x larger inputs (its norm weight scaled) gets 100x the importance while the
    others keep theirs."""
    from runtime.backends.numpy_backend import rms_norm
    from runtime.mixed_quant import float_weights, importance_matrix, open_float_source

    _, files, text = models
    src = open_float_source(files[T.F16], tmp_path)
    weights = float_weights(src)
    ids = src.load_tokenizer().encode(text.read_text()[:400], parse_special=False)[:48]
    imp = importance_matrix(src, weights, ids)
    assert "token_embd.weight" not in imp or src.config.tied_embeddings  # looked up only
    assert {"blk.0.attn_q.weight", "blk.0.attn_output.weight", "blk.0.ffn_down.weight"} <= set(imp)
    x = np.concatenate([src.tensors["token_embd.weight"].rows(t, t + 1) for t in ids])
    h = rms_norm(x, weights["blk.0.attn_norm.weight"], src.config.norm_eps).astype(np.float64)
    np.testing.assert_allclose(imp["blk.0.attn_q.weight"], (h * h).mean(axis=0), rtol=1e-4)
    assert np.array_equal(imp["blk.0.attn_q.weight"], imp["blk.0.attn_v.weight"])
    assert imp["blk.0.ffn_down.weight"].shape == (weights["blk.0.ffn_down.weight"].shape[1],)

    louder = dict(weights)
    louder["blk.0.attn_norm.weight"] = weights["blk.0.attn_norm.weight"].copy()
    louder["blk.0.attn_norm.weight"][7] *= 10
    ratio = importance_matrix(src, louder, ids)["blk.0.attn_q.weight"] / imp["blk.0.attn_q.weight"]
    assert ratio[7] == pytest.approx(100, rel=1e-3)
    assert np.allclose(np.delete(ratio, 7), 1, rtol=1e-4)


def test_gram_matrices_are_the_second_moments_of_the_real_inputs(models, tmp_path):
    """With grams, each matrix's Gram matrix is the mean of x x^T over its real inputs (the
    normed embeddings for the first attention projections, by hand here), its diagonal is the
    importance, and matrices fed the same input share one array."""
    from runtime.backends.numpy_backend import rms_norm
    from runtime.mixed_quant import calibration_stats, float_weights, open_float_source

    _, files, text = models
    src = open_float_source(files[T.F16], tmp_path)
    weights = float_weights(src)
    ids = src.load_tokenizer().encode(text.read_text()[:400], parse_special=False)[:48]
    stats = calibration_stats(src, weights, ids, grams=True)
    assert stats.grams is not None and set(stats.grams) == set(stats.importance) - {
        "token_embd.weight"}
    x = np.concatenate([src.tensors["token_embd.weight"].rows(t, t + 1) for t in ids])
    h = rms_norm(x, weights["blk.0.attn_norm.weight"], src.config.norm_eps).astype(np.float64)
    np.testing.assert_allclose(stats.grams["blk.0.attn_q.weight"], h.T @ h / len(h),
                               rtol=1e-4, atol=1e-6)
    assert stats.grams["blk.0.attn_k.weight"] is stats.grams["blk.0.attn_q.weight"]
    assert stats.grams["blk.0.ffn_up.weight"] is stats.grams["blk.0.ffn_gate.weight"]
    assert stats.grams["blk.0.ffn_down.weight"] is not stats.grams["blk.0.ffn_gate.weight"]
    for name, gram in stats.grams.items():
        np.testing.assert_allclose(np.diag(gram), stats.importance[name], rtol=1e-5)
    assert calibration_stats(src, weights, ids).grams is None  # the importance alone


def test_gptq_gives_way_to_the_gram_limit_and_says_so(models, tmp_path, monkeypatch):
    """A model whose Gram matrices would pass GRAM_LIMIT is quantized with nearest levels, and
    the plan says why; the file is still written and loads."""
    from runtime import mixed_quant
    from runtime.model_file import open_model

    _, files, text = models
    monkeypatch.setattr(mixed_quant, "GRAM_LIMIT", 1024)
    out = tmp_path / "mixed.gguf"
    plan = mixed_quant.quantize_model(files[T.F16], out, target_bpw=5, calibration=text,
                                      calibration_tokens=32)
    assert plan.gptq is False and plan.imatrix is not None
    assert plan.gptq_note.endswith("bytes, over the limit of 1,024")
    assert open_model(out).tensors["blk.0.ffn_down.weight"].qtype.name == next(
        t.choice.name for t in plan.tensors if t.name == "blk.0.ffn_down.weight")


def test_bad_quantize_and_eval_input_is_one_line_and_exit_2(models, tmp_path, claw):
    _, files, text = models
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    out = tmp_path / "x.gguf"
    f16 = str(files[T.F16])
    cases = [
        (["quantize", str(tmp_path / "none.gguf"), str(out), "--target-bpw", "5"],
         "no such model file"),
        (["quantize", str(files[T.Q8_0]), str(out), "--target-bpw", "5"],
         "is already quantized (Q8_0)"),
        (["quantize", f16, str(out), "--target-bpw", "1.0"], "--target-bpw 1 cannot be met"),
        (["quantize", f16, str(out), "--max-bytes", "1000"], "--max-bytes 1000 cannot be met"),
        (["quantize", f16, str(out)], "exactly one of --target-bpw and --max-bytes"),
        (["quantize", f16, str(out), "--target-bpw", "5", "--calibration",
          str(tmp_path / "none.txt")], "no such file"),
        (["quantize", f16, str(out), "--target-bpw", "5", "--calibration", str(binary)],
         "not a UTF-8 text file"),
        (["quantize", f16, str(tmp_path / "no" / "x.gguf"), "--target-bpw", "5"],
         "does not exist"),
        (["eval", f16, "--text", str(tmp_path / "none.txt")], "no such file"),
        (["eval", f16, "--text", str(text), "--ctx", "100000"], "larger than the model's"),
    ]
    for args, message in cases:
        r = claw("runtime", *args)
        assert r.code == 2, (args, r.err)
        assert message in r.err and "Traceback" not in r.err, (args, r.err)
        assert len(r.err.strip().splitlines()) == 1, r.err
        assert not out.exists() and not list(tmp_path.glob(".x.gguf*"))


def test_plain_byte_level_vocabulary_gets_the_name_llama_cpp_knows():
    """llama.cpp refuses `tokenizer.ggml.pre = "gpt2"` ("unknown pre-tokenizer type"): the
    GPT-2 splitter is "gpt-2" there, and our files must load in it."""
    from pathlib import Path

    from runtime.convert import _pre_tokenizer_name

    assert _pre_tokenizer_name({"type": "ByteLevel", "use_regex": True}, Path("t.json")) == "gpt-2"
