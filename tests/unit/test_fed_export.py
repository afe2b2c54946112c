"""`claw fed runs` and `claw fed export` on hand-made run directories (numpy only, no torch):
the merge arithmetic against the LoRA formula, and every kind of broken run refused with
one line naming the file and field, exit 2, nothing written. The check against peft itself,
on a real adapter, is tests/integration/test_fed_export.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from runtime.convert import permute_for_llama_cpp
from runtime.model_file import open_model
from runtime.selftest import DIM, FFN, HEADS, KV_HEADS, write_tiny_llama

pytestmark = pytest.mark.unit

KV = KV_HEADS * DIM // HEADS
SHAPES = {"self_attn.q_proj": (DIM, DIM), "self_attn.k_proj": (KV, DIM),
          "self_attn.v_proj": (KV, DIM), "mlp.down_proj": (DIM, FFN)}  # (out, in)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("base") / "base.gguf")


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path / "state" / "clawforge" / "fed"


def lora_tensors(r: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(2):
        for module, (n_out, n_in) in SHAPES.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            out[key + ".lora_A.weight"] = rng.normal(0, 0.1, (r, n_in)).astype(np.float32)
            out[key + ".lora_B.weight"] = rng.normal(0, 0.1, (n_out, r)).astype(np.float32)
    return out


def make_run(root: Path, base: Path, run_id: str = "fed-20261126-081500-ab12", *,
             run: dict | None = None, rounds: list | None = None,
             tensors: dict | None = None, adapter_cfg: dict | None = None) -> Path:
    folder = root / run_id
    (folder / "adapter").mkdir(parents=True)
    record = {"id": run_id, "model": str(base),
              "model_sha256": hashlib.sha256(base.read_bytes()).hexdigest(), "rounds": 2,
              "secagg": True, "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj"]},
              "status": "succeeded", "started": "2026-11-26T08:15:00Z",
              "ended": "2026-11-26T08:17:00Z", "clients": ["a", "b", "c"]}
    record.update(run or {})
    (folder / "run.json").write_text(json.dumps({k: v for k, v in record.items()
                                                 if v != "<drop>"}))
    lines = rounds if rounds is not None else [
        {"round": i, "clients_joined": 3, "clients_dropped": 0, "local_loss": 2.0 / i,
         "eval_loss": 2.5 / i, "seconds": 1.5, "bytes_per_client": 4096} for i in (1, 2)]
    (folder / "rounds.jsonl").write_text("".join(
        (line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
           "lora_dropout": 0.0, "bias": "none", "use_rslora": False}
    cfg.update(adapter_cfg or {})
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(lora_tensors() if tensors is None else tensors,
              str(folder / "adapter" / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize("rslora", [False, True])
def test_export_adds_the_scaled_product_in_gguf_row_order(base, tmp_path, claw, rslora):
    run = make_run(tmp_path, base, adapter_cfg={"use_rslora": rslora})
    out = tmp_path / "tuned.gguf"
    r = claw("fed", "export", str(run), "-o", str(out), "--quantize", "f32")
    assert r.code == 0, r.err
    assert f"wrote {out}: {out.stat().st_size:,} bytes, 32.000 bits/weight" in r.out
    before, after = open_model(base).tensors, open_model(out).tensors
    scale = 8 / (2.0 if rslora else 4)
    lora = lora_tensors()
    for layer in range(2):
        key = f"base_model.model.model.layers.{layer}."
        for module, name, heads in (("self_attn.q_proj", "attn_q", HEADS),
                                    ("self_attn.k_proj", "attn_k", KV_HEADS),
                                    ("self_attn.v_proj", "attn_v", None),
                                    ("mlp.down_proj", "ffn_down", None)):
            delta = scale * lora[key + module + ".lora_B.weight"] @ lora[
                key + module + ".lora_A.weight"]
            if heads:
                delta = permute_for_llama_cpp(delta, heads)
            t = f"blk.{layer}.{name}.weight"
            got = after[t].to_float32() - before[t].to_float32()
            assert np.abs(got - delta).max() < 1e-6
        for untouched in ("attn_output", "ffn_gate", "ffn_up", "attn_norm"):
            t = f"blk.{layer}.{untouched}.weight"
            assert np.array_equal(after[t].to_float32(), before[t].to_float32())
    meta_before, meta_after = open_model(base).metadata, open_model(out).metadata
    assert meta_after["tokenizer.ggml.tokens"] == meta_before["tokenizer.ggml.tokens"]


def test_export_by_id_defaults_to_f16_and_reports_json(base, state, claw, tmp_path):
    make_run(state, base)
    out = tmp_path / "tuned.gguf"
    r = claw("fed", "export", "fed-20261126-081500-ab12", "-o", str(out), "--json")
    assert r.code == 0, r.err
    result = json.loads(r.out)
    assert result["types"] == {"F16": 2 * 7 + 2, "F32": 2 * 2 + 1}
    assert result["file_bytes"] == out.stat().st_size and 16 < result["bpw"] < 17
    assert len(result["merged"]) == 8 and result["run"] == "fed-20261126-081500-ab12"


def test_runs_lists_each_run_with_its_last_eval_loss(base, state, claw):
    make_run(state, base, "fed-20261126-090000-cd34",
             run={"status": "running", "started": "2026-11-26T09:00:00Z", "ended": None},
             rounds=[])
    make_run(state, base)
    broken = make_run(state, base, "fed-20261126-100000-ef56", run={"rounds": "two"})
    r = claw("fed", "runs", "--json")
    assert r.code == 0, r.err
    assert f"warning: {broken / 'run.json'}: field 'rounds' is 'two'" in r.err
    runs = json.loads(r.out)
    assert [x["id"] for x in runs] == ["fed-20261126-081500-ab12", "fed-20261126-090000-cd34"]
    assert runs[0]["final_eval_loss"] == 1.25 and runs[0]["rounds_done"] == 2
    assert runs[1]["status"] == "running" and runs[1]["final_eval_loss"] is None
    table = claw("fed", "runs")
    assert table.code == 0
    assert "fed-20261126-081500-ab12" in table.out and "1.2500" in table.out
    assert "2/2" in table.out and "0/2" in table.out


BAD_RUNS = {
    "missing field": (dict(run={"model_sha256": "<drop>"}), "run.json: field 'model_sha256' "
                      "is missing"),
    "bad status": (dict(run={"status": "done"}), "field 'status' is 'done'"),
    "secagg not bool": (dict(run={"secagg": "yes"}), "field 'secagg' is 'yes'"),
    "rounds line": (dict(rounds=["{not json"]), "rounds.jsonl:1: not valid JSON"),
    "rounds field": (dict(rounds=[{"round": 1, "clients_joined": "3", "clients_dropped": 0}]),
                     "rounds.jsonl:1: field 'clients_joined' is '3'"),
    "still running": (dict(run={"status": "running"}), "is running (expected succeeded"),
    "not lora": (dict(adapter_cfg={"peft_type": "IA3"}), "field 'peft_type' is 'IA3'"),
    "dora": (dict(adapter_cfg={"use_dora": True}), "field 'use_dora' is true"),
    "lora bias": (dict(adapter_cfg={"lora_bias": True}), "field 'lora_bias' is true"),
    "lone A": (dict(tensors={k: v for k, v in lora_tensors().items() if "lora_B" not in k}),
               "has no lora_B"),
    "wrong shape": (dict(tensors={k: (v[:, :32] if "q_proj.lora_A" in k else v)
                                  for k, v in lora_tensors().items()}),
                    "the model's blk.0.attn_q.weight is 64×64 (expected an adapter trained "
                    "on this model)"),
    "unknown module": (dict(tensors={
        "base_model.model.model.embed_tokens.lora_A.weight": np.zeros((4, 64), np.float32),
        "base_model.model.model.embed_tokens.lora_B.weight": np.zeros((64, 4), np.float32)}),
        "module model.embed_tokens is not a weight of"),
    "rank mismatch": (dict(tensors={k: (v[:2] if "q_proj.lora_A" in k else v)
                                    for k, v in lora_tensors().items()}),
                      "lora_A is (2, 64), lora_B (64, 4)"),
    "other base": (dict(run={"model_sha256": "0" * 64}), "the run trained on 0000"),
    "no base": (dict(run={"model": "/nonexistent/base.gguf"}),
                "/nonexistent/base.gguf does not exist"),
}


@pytest.mark.parametrize("case", BAD_RUNS)
def test_broken_runs_are_refused_with_one_line(base, tmp_path, claw, case):
    kwargs, message = BAD_RUNS[case]
    run = make_run(tmp_path, base, **kwargs)
    out = tmp_path / "tuned.gguf"
    r = claw("fed", "export", str(run), "-o", str(out))
    assert r.code == 2, (r.out, r.err)
    errors = [line for line in r.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], r.err  # progress lines may precede it
    assert r.err.strip().splitlines()[-1] == errors[0] and "Traceback" not in r.err
    assert not out.exists() and not list(tmp_path.glob(".tuned.gguf*"))


def test_missing_adapter_and_unknown_run(base, state, claw, tmp_path):
    run = make_run(tmp_path, base)
    (run / "adapter" / "adapter_model.safetensors").unlink()
    r = claw("fed", "export", str(run), "-o", str(tmp_path / "o.gguf"))
    assert r.code == 2 and "adapter_model.safetensors: missing" in r.err
    r = claw("fed", "export", "fed-nope", "-o", str(tmp_path / "o.gguf"))
    assert r.code == 2 and "run 'fed-nope': no such run" in r.err and "has no runs" in r.err
    r = claw("fed", "export", str(tmp_path), "-o", str(tmp_path / "o.gguf"))
    assert r.code == 2 and "not a run directory (expected run.json in it)" in r.err


@pytest.mark.parametrize("args, message", [
    (["--quantize", "Q3_K"], "--quantize 'Q3_K' is not supported"),
    (["--quantize", "Q8_0", "--target-bpw", "5"], "at most one of --quantize and --target-bpw"),
    (["--calibration", "t.txt"], "--calibration is used only with --target-bpw"),
])
def test_bad_options_exit_2(base, tmp_path, claw, args, message):
    run = make_run(tmp_path, base)
    r = claw("fed", "export", str(run), "-o", str(tmp_path / "o.gguf"), *args)
    assert r.code == 2 and message in r.err, r.err


def test_output_folder_must_exist(base, tmp_path, claw):
    run = make_run(tmp_path, base)
    r = claw("fed", "export", str(run), "-o", str(tmp_path / "no" / "o.gguf"))
    assert r.code == 2 and "folder" in r.err and "does not exist" in r.err


def test_unfinished_run_exports_with_the_flag(base, tmp_path, claw):
    run = make_run(tmp_path, base, run={"status": "failed"})
    out = tmp_path / "o.gguf"
    r = claw("fed", "export", str(run), "-o", str(out), "--allow-unfinished")
    assert r.code == 0, r.err
    assert open_model(out).config.n_layers == 2


def test_a_quantized_base_is_dequantized_then_merged(base, tmp_path, claw):
    from gguf import GGMLQuantizationType as T

    from runtime.mixed_quant import float_weights, uniform_types, write

    src = open_model(base)
    q8 = write(src, float_weights(src), uniform_types(src, T.Q8_0), tmp_path / "base-q8.gguf")
    run = make_run(tmp_path, q8)
    out = tmp_path / "tuned.gguf"
    r = claw("fed", "export", str(run), "-o", str(out), "--quantize", "F32")
    assert r.code == 0, r.err
    lora = lora_tensors()
    key = "base_model.model.model.layers.1.self_attn.v_proj"
    delta = 2.0 * lora[key + ".lora_B.weight"] @ lora[key + ".lora_A.weight"]
    got = (open_model(out).tensors["blk.1.attn_v.weight"].to_float32()
           - open_model(q8).tensors["blk.1.attn_v.weight"].to_float32())
    assert np.abs(got - delta).max() < 1e-6
