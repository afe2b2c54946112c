"""A whole model the way a user meets it: a Hugging Face directory with a real tokenizer,
converted by `claw runtime convert`, inspected by `claw runtime info`, run by
`claw runtime generate` and the Python API, against transformers and `tokenizers`."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from runtime.api import Model  # noqa: E402
from runtime.sampling import SamplingParams  # noqa: E402
from tests.tiny_models import tiny_hf_model  # noqa: E402
from tests.unit import tokenizer_fixtures as fx  # noqa: E402

pytestmark = pytest.mark.unit

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    tok = fx.train_byte_level("llama3")
    folder = tmp_path_factory.mktemp("hf")
    fx.save(tok, folder, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                          "chat_template": CHAT_TEMPLATE})
    model = tiny_hf_model(vocab_size=tok.get_vocab_size(with_added_tokens=True), seed=3,
                          bos_token_id=tok.token_to_id("<|begin_of_text|>"),
                          eos_token_id=tok.token_to_id("<|eot_id|>"))
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model, tok


@pytest.fixture(scope="module")
def gguf_files(hf_dir, tmp_path_factory):
    from runtime.convert import convert, tokenizer_metadata

    folder, _, _ = hf_dir
    out = tmp_path_factory.mktemp("gguf")
    from gguf import GGMLQuantizationType as T

    return {t: convert(folder, out / f"m-{t.name}.gguf", t,
                       tokenizer_metadata=tokenizer_metadata(folder)) for t in (T.F32, T.Q8_0)}


def test_convert_and_info_through_the_cli(hf_dir, tmp_path, claw):
    folder, _, tok = hf_dir
    out = tmp_path / "m.gguf"
    converted = claw("runtime", "convert", str(folder), "-o", str(out), "--type", "q8_0")
    assert converted.code == 0, converted.err
    info = claw("runtime", "info", str(out), "--json")
    assert info.code == 0, info.err
    data = json.loads(info.out)
    assert data["arch"] == "llama" and data["format"] == "gguf"
    assert set(data["tensor_bytes"]) == {"Q8_0", "F32"}
    assert data["q8_activation_types"] == [  # the numerics the file runs with: all but F32/F16
        "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"]
    assert data["tokenizer"]["vocab_size"] == tok.get_vocab_size(with_added_tokens=True)
    assert data["tokenizer"]["bos_id"] == tok.token_to_id("<|begin_of_text|>")
    table = claw("runtime", "info", str(out))
    assert "Q8_0 tensors" in table.out and "activations" in table.out


def test_gguf_tokenizer_equals_the_tokenizers_library(hf_dir, gguf_files):
    _, _, tok = hf_dir
    model = Model(next(iter(gguf_files.values())), backend="numpy")
    for line in fx.CORPUS:
        assert model.tokenize(line) == tok.encode(line).ids, line
        assert model.detokenize(tok.encode(line).ids) == tok.decode(tok.encode(line).ids,
                                                                     skip_special_tokens=False)


@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_greedy_text_equals_transformers(hf_dir, gguf_files, source, claw):
    folder, model, tok = hf_dir
    from gguf import GGMLQuantizationType as T

    path = folder if source == "hf" else gguf_files[T.F32]
    prompt = "The quick brown fox"
    result = claw("runtime", "generate", str(path), "-p", prompt, "-t", "0", "-n", "24",
                  "--backend", "numpy", "--json")
    assert result.code == 0, result.err
    ours = json.loads(result.out)
    ids = tok.encode(prompt).ids
    with torch.no_grad():
        batch = torch.tensor([ids])  # an explicit mask: id 0 (BOS) must not read as padding
        ref = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=24,
                             do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(ids):].tolist()
    n = ours["completion_tokens"]
    assert ours["text"] == tok.decode(ref[:n], skip_special_tokens=False)
    if ours["finish_reason"] == "stop":  # stopped on an end-of-turn token
        assert ref[n] == tok.token_to_id("<|eot_id|>")
    else:
        assert n == 24


def test_streaming_seed_and_stop_strings(hf_dir):
    folder, _, _ = hf_dir
    model = Model(folder, backend="numpy")
    sampled = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=11,
                             max_tokens=20)
    first = model.generate("Hello", sampled)
    pieces = list(first)
    assert "".join(pieces) == first.result.text and len(pieces) > 1
    second = model.generate("Hello", SamplingParams(**{**sampled.__dict__}))
    assert "".join(second) == first.result.text  # same seed, same text
    greedy = model.generate("Hello", SamplingParams.greedy(max_tokens=20))
    text = "".join(greedy)
    stop = text[6:9]
    assert len(stop) == 3
    stopped = model.generate("Hello", SamplingParams.greedy(max_tokens=20, stop=[stop]))
    shown = "".join(stopped)
    assert shown == text[: text.index(stop)] == stopped.result.text
    assert stopped.result.finish_reason == "stop"


def test_chat_prompt_uses_the_template(hf_dir, gguf_files, claw):
    _, _, tok = hf_dir
    model = Model(next(iter(gguf_files.values())), backend="numpy")
    prompt = model.chat_prompt([{"role": "user", "content": " hi "}])
    assert prompt == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = model.tokenize(prompt, add_bos=False)
    assert ids[0] == tok.token_to_id("<|begin_of_text|>") and ids.count(ids[0]) == 1
    result = claw("runtime", "generate", str(next(iter(gguf_files.values()))), "-p", "hi",
                  "--chat", "-t", "0", "-n", "4", "--json", "--backend", "numpy")
    assert result.code == 0, result.err
    assert json.loads(result.out)["prompt_tokens"] == len(ids)


def test_bad_runtime_input_is_one_line_and_exit_2(hf_dir, tmp_path, claw):
    folder, _, _ = hf_dir
    cases = [
        (["runtime", "info", str(tmp_path / "none.gguf")], "no such model file"),
        (["runtime", "bench", str(tmp_path / "none.gguf")], "no such model file"),
        (["runtime", "generate", str(folder), "-p", "x", "--backend", "cuda"],
         "backend 'cuda' is not known"),
        (["runtime", "convert", str(folder), "-o", str(tmp_path / "x.gguf"), "--type", "q3_k"],
         "--type 'q3_k' is not supported"),
        (["runtime", "generate", str(folder), "-p", "word " * 300, "--ctx", "64"],
         "more than the context of 64 allows"),
    ]
    for args, message in cases:
        result = claw(*args)
        assert result.code == 2, (args, result.err)
        assert message in result.err and "Traceback" not in result.err
        assert not (tmp_path / "x.gguf").exists()
    assert np.isfinite(Model(folder, backend="numpy").logits([1, 2, 3])).all()
