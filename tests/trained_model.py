"""A tiny Llama trained for a few minutes on local text, for tests and benchmarks that need a
model whose loss actually depends on its weights (a random model's flat loss landscape makes
every quantization look equally good).

Text: the licence texts Debian ships in /usr/share/common-licenses (verbatim copying of these
is permitted by each licence; nothing is downloaded). GPL-2 is held out as the evaluation text;
the rest is the training text. Everything is made here: a byte-level BPE of 512 tokens trained
with `tokenizers`; a 2-layer width-256 Llama (GQA 4/2, FFN 512, ~1.4 M weights; width 256 so
that K-quants' 256-weight blocks fit its rows) trained with torch on CPU (200 steps of 16 x 64
tokens, ~3-10 min on 2 shared cores); saved as a Hugging Face directory and converted to F32
and F16 GGUF by our converter. The result is cached under
~/.cache/clawforge/trained-llama/<hash of the text, the settings and the recipe version>, so
only the first run pays the training.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from runtime.files import umask_mode

LICENSES = Path("/usr/share/common-licenses")
TRAIN_FILES = ("Apache-2.0", "Artistic", "BSD", "CC0-1.0", "GFDL-1.2", "GFDL-1.3", "GPL-1",
               "GPL-3", "LGPL-2", "LGPL-2.1", "MPL-1.1", "MPL-2.0")
EVAL_FILE = "GPL-2"
CACHE = Path(os.environ.get("CLAW_TRAINED_CACHE",
                            Path.home() / ".cache" / "clawforge" / "trained-llama"))
RECIPE = 2  # bump when training or conversion changes (the cache key: text, SETTINGS, this)
SETTINGS = dict(vocab=512, dim=256, layers=2, heads=4, kv_heads=2, ffn=512, seq=64, batch=16,
                steps=200, lr=3e-3, seed=0)
# bench only (bench/bench_quant.py --model large; never `make test`): a 3-layer width-512 Llama
# (GQA 8/2, FFN 1024, 7.2 M weights, every row a multiple of 256 so K-quants apply; sized to
# train in ~10 min on the shared 2 cores), with three licences held out so the evaluation has
# ~3x the tokens and perplexity a smaller error
LARGE_SETTINGS = dict(vocab=512, dim=512, layers=3, heads=8, kv_heads=2, ffn=1024, seq=128,
                      batch=16, steps=200, lr=2e-3, seed=0,
                      held_out=["GPL-2", "LGPL-2.1", "GFDL-1.2"])


@dataclass(frozen=True)
class TrainedModel:
    hf_dir: Path
    f32: Path  # GGUF
    f16: Path  # GGUF
    eval_text: Path  # held-out text (GPL-2)
    calibration_text: Path  # a slice of the training text
    final_loss: float


def available() -> str | None:
    """None when the texts and torch are here, else why not (for pytest.skip)."""
    missing = [f for f in (*TRAIN_FILES, EVAL_FILE) if not (LICENSES / f).is_file()]
    if missing:
        return f"no {LICENSES}/{missing[0]} (the training text)"
    try:
        import tokenizers  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        return f"training needs torch, transformers and tokenizers ({e})"
    return None


def trained_or_skip() -> TrainedModel:
    """The trained model, or pytest.skip with the reason it can't be made here."""
    import pytest

    if why := available():
        pytest.skip(why)
    return trained_model()


def _texts(held_out: list[str]) -> tuple[str, str]:
    read = [f for f in (*TRAIN_FILES, EVAL_FILE) if f not in held_out]
    train = "\n\n".join((LICENSES / f).read_text(encoding="utf-8") for f in read)
    return train, "\n\n".join((LICENSES / f).read_text(encoding="utf-8") for f in held_out)


def trained_model(settings: dict | None = None) -> TrainedModel:
    """The cached model, trained first when missing (a partial run leaves nothing behind).
    `settings`: SETTINGS (the default, what tests use) or LARGE_SETTINGS (the bench's)."""
    s = settings or SETTINGS
    train, held_out = _texts(s.get("held_out", [EVAL_FILE]))
    key = hashlib.sha256(json.dumps({**s, "recipe": RECIPE}, sort_keys=True).encode()
                         + train.encode()).hexdigest()[:16]
    folder = CACHE / key
    if not (folder / "done.json").is_file():
        tmp = CACHE / f".{key}.part"
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        loss = _train(tmp, train, s)
        (tmp / "eval.txt").write_text(held_out, encoding="utf-8")
        (tmp / "calibration.txt").write_text(train[-6000:], encoding="utf-8")
        (tmp / "done.json").write_text(json.dumps({"final_loss": loss, **s}))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.replace(folder)
    for gguf_file in folder.glob("*.gguf"):  # a cache from before runtime.files.publish: 0600
        gguf_file.chmod(umask_mode())
    done = json.loads((folder / "done.json").read_text())
    return TrainedModel(folder / "hf", folder / "f32.gguf", folder / "f16.gguf",
                        folder / "eval.txt", folder / "calibration.txt", done["final_loss"])


def _tokenizer(folder: Path, text: str, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                  special_tokens=["<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.split("\n\n"), trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "add_bos_token": True}))
    return tok


def _train(out: Path, text: str, s: dict) -> float:
    """Train, save the HF directory and the two GGUF files into `out`; the last loss."""
    import numpy as np
    import torch
    import transformers
    from gguf import GGMLQuantizationType as T

    from runtime.convert import convert, tokenizer_metadata

    hf = out / "hf"
    hf.mkdir()
    tok = _tokenizer(hf, text, s["vocab"])
    ids = np.array(tok.encode(text).ids, dtype=np.int64)
    bos, eos = tok.token_to_id("<|bos|>"), tok.token_to_id("<|eos|>")
    torch.manual_seed(s["seed"])
    torch.set_num_threads(min(os.cpu_count() or 2, 4))
    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=s["dim"], intermediate_size=s["ffn"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"], max_position_embeddings=2 * s["seq"],
        rms_norm_eps=1e-5, bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, s["lr"], total_steps=s["steps"],
                                                pct_start=0.1)
    rng = np.random.default_rng(s["seed"])
    model.train()
    loss = torch.tensor(0.0)
    for step in range(s["steps"]):
        starts = rng.integers(0, len(ids) - s["seq"], s["batch"])
        batch = torch.from_numpy(np.stack([ids[i:i + s["seq"]] for i in starts]))
        batch[:, 0] = bos  # windows start with BOS, as the runtime and llama.cpp score them
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0:
            print(f"step {step}/{s['steps']} loss {float(loss.detach()):.3f}", file=sys.stderr,
                  flush=True)
    model.eval()
    model.save_pretrained(hf, safe_serialization=True)
    meta = tokenizer_metadata(hf)
    convert(hf, out / "f32.gguf", T.F32, tokenizer_metadata=meta)
    convert(hf, out / "f16.gguf", T.F16, tokenizer_metadata=meta)
    return float(loss.detach())


if __name__ == "__main__":  # make the cache ahead of a run: python -m tests.trained_model [large]
    import time

    t = time.perf_counter()
    m = trained_model(LARGE_SETTINGS if sys.argv[1:] == ["large"] else None)
    print(f"{m.hf_dir.parent} loss {m.final_loss:.3f} ({time.perf_counter() - t:.0f} s)")
