"""runtime.fed.model: the GGUF in torch is the runtime's model; the adapter travels as arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests import trained_model as tm

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("peft")
    return tm.trained_or_skip()


@pytest.fixture(scope="module")
def lora_model(tiny):
    from runtime.fed.model import LoraSettings, load_base, with_lora

    base, tok = load_base(tiny.f32)
    return with_lora(base, LoraSettings()), tok


def test_zero_b_lora_matches_runtime_numpy_logits(tiny, lora_model):
    import torch

    from runtime.api import Model

    model, tok = lora_model
    text = tiny.eval_text.read_text()[:400]
    ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]][:48]
    runtime = Model(tiny.f32, backend="numpy")
    assert runtime.tokenize(text, add_bos=False, parse_special=False)[:20] == ids[1:21]
    want = runtime.logits(ids)
    with torch.no_grad():
        got = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-3 * max(1.0, float(np.abs(want).max()))


def test_adapter_round_trip_and_shape_check(lora_model):
    from runtime.fed.model import get_adapter, set_adapter

    model, _ = lora_model
    arrays = get_adapter(model)
    # 2 layers × 4 targets × (A, B), A is r×in, B is out×r and starts at zero
    assert len(arrays) == 16
    assert all(a.shape[0] == 8 or a.shape[1] == 8 for a in arrays)
    changed = [a + 0.5 for a in arrays]
    set_adapter(model, changed)
    assert all(np.array_equal(a, b) for a, b in zip(get_adapter(model), changed, strict=True))
    set_adapter(model, arrays)
    with pytest.raises(ValueError, match="array 0 has shape"):
        set_adapter(model, [arrays[0][:, :3], *arrays[1:]])
    with pytest.raises(ValueError, match="15 arrays"):
        set_adapter(model, arrays[1:])


def test_save_adapter_loads_back_with_peft(tiny, lora_model, tmp_path):
    import torch
    from peft import PeftModel

    from runtime.fed.model import LoraSettings, adapter_state, load_base, save_adapter

    model, _ = lora_model
    state = adapter_state(model)
    names = list(state)
    assert names[0].startswith("base_model.model.model.layers.0.self_attn.")
    arrays = [a + np.float32(0.01) for a in state.values()]
    out = save_adapter(tmp_path / "adapter", names, arrays, LoraSettings())
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    base, _ = load_base(tiny.f32)
    loaded = PeftModel.from_pretrained(base, str(out))
    got = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert len(got) == len(names)
    q_b = next(v for k, v in got.items() if "layers.0.self_attn.q_proj.lora_B" in k)
    assert torch.allclose(q_b, torch.full_like(q_b, 0.01))


def test_run_settings_round_trip_through_the_run_config():
    from runtime.fed.settings import RunSettings

    s = RunSettings(num_rounds=5, lr=0.01, secagg=False, target_modules=("q_proj", "v_proj"),
                    run_dir="/x/run", model_sha256="ab" * 32)
    config = s.to_run_config()
    assert config["num-rounds"] == 5 and config["target-modules"] == "q_proj,v_proj"
    assert RunSettings.from_run_config(config) == s
    assert RunSettings.from_run_config({"lora-r": 4}).lora.r == 4


def test_held_out_is_every_fifth_paragraph():
    from runtime.fed.data import split_held_out

    text = "\n\n".join(f"p{i}" for i in range(20))
    train, held = split_held_out(text)
    assert held.split("\n\n") == ["p4", "p9", "p14", "p19"]
    assert len(train.split("\n\n")) == 16 and "p4" not in train.split("\n\n")
