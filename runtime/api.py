"""The runtime's Python API, used by the CLI, the HTTP server and the benchmarks.

    model = Model.load("model.gguf", backend="auto")
    ids = model.tokenize("Hello")
    for piece in model.generate("Once upon a time", SamplingParams(seed=1)):
        print(piece, end="")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from runtime.backends import create_backend
from runtime.errors import ModelError
from runtime.generate import Generation
from runtime.model_file import open_model
from runtime.sampling import SamplingParams


def open_opencl_device() -> Any:
    """(Device, ProgramCache) for --backend opencl, as a clear error when there is none."""
    from runtime.backends.opencl_device import NoDevice
    from runtime.errors import DeviceError

    try:
        from runtime.backends.opencl_backend import open_device

        return open_device()
    except (NoDevice, ImportError) as e:
        raise DeviceError(f"--backend opencl: {e} (expected an OpenCL device, or --backend "
                          "numpy / auto)") from None


class Model:
    def __init__(self, path: str | os.PathLike[str], *, backend: str = "auto",
                 n_ctx: int | None = None, memory_budget: int | str | None = None,
                 prefill_chunk: int = 256, measure: bool | None = None, sequences: int = 1):
        """`memory_budget` (bytes, or '512M' / '2G') bounds the whole process's resident
        memory: the plan (`self.plan`) decides which layers stay resident and which stream.
        `measure` times disk, memory and dequantization for the plan's speed estimate
        (default: when there is a budget; cached per machine). `sequences`: KV caches held at
        once (the server's batch)."""
        from runtime.memory_plan import make_plan, measure_rates, parse_budget, plan_backend

        budget = parse_budget(memory_budget)
        if prefill_chunk < 1:
            raise ModelError(f"prefill_chunk {prefill_chunk} is not valid (expected ≥ 1)")
        self.prefill_chunk = prefill_chunk
        self.source = open_model(path)
        self.config = self.source.config
        self.tokenizer = self.source.load_tokenizer() if self.source.load_tokenizer else None
        self.n_ctx = min(n_ctx or self.config.context_length, self.config.context_length)
        planned_for, device = plan_backend(backend), None
        if planned_for == "opencl" and budget is not None:  # the driver is part of the baseline
            device = open_opencl_device()
        self.plan = make_plan(self.source, budget, n_ctx=self.n_ctx, chunk=prefill_chunk,
                              sequences=sequences, backend=planned_for)  # below minimum: fails
        # the measured speeds are the numpy tiers': an OpenCL plan gives none
        if planned_for == "numpy" and (budget is not None if measure is None else measure):
            self.plan = make_plan(self.source, budget, n_ctx=self.n_ctx, chunk=prefill_chunk,
                                  sequences=sequences, baseline=self.plan.baseline,
                                  rates=measure_rates(self.source, budget=budget))
        choice = create_backend(backend, self.source, plan=self.plan, device=device)
        self.backend, self.backend_reason = choice.backend, choice.reason

    @classmethod
    def load(cls, path: str | os.PathLike[str], **options: Any) -> Model:
        """`Model.load(path, backend=..., n_ctx=...)`: the same as `Model(path, ...)`."""
        return cls(path, **options)

    def tokenize(self, text: str, *, add_bos: bool | None = None,
                 parse_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos, parse_special=parse_special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits at every position of `ids`, from an empty cache: (len(ids), vocab). The
        forward passes run `prefill_chunk` tokens at a time, so activations stay bounded."""
        ids, step = list(ids), self.prefill_chunk
        cache = self.backend.new_cache(max(len(ids), 1))
        return np.concatenate([self.backend.forward(ids[i:i + step], cache, all_logits=True)
                               for i in range(0, max(len(ids), 1), step)])

    def chat_prompt(self, messages: list[dict[str, Any]],
                    add_generation_prompt: bool = True) -> str:
        from runtime.chat import DEFAULT_CHATML, render_chat

        meta = self.source.metadata
        template = meta.get("tokenizer.chat_template") or self._hf_chat_template() or DEFAULT_CHATML
        tok = self.tokenizer
        bos = tok.token_text(tok.bos_id) if tok.bos_id is not None else ""
        eos = tok.token_text(tok.eos_id) if tok.eos_id is not None else ""
        return render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=bos, eos_token=eos)

    def _hf_chat_template(self) -> str | None:
        import json

        path = self.source.path / "tokenizer_config.json"
        if self.source.format == "safetensors" and path.is_file():
            return json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        return None

    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None, *,
                 add_bos: bool | None = None) -> Generation:
        params = params or SamplingParams()
        ids = self.tokenize(prompt, add_bos=add_bos) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ModelError("the prompt is empty (expected at least one token)")
        if len(ids) >= self.n_ctx:
            raise ModelError(f"the prompt has {len(ids)} tokens, more than the context of "
                             f"{self.n_ctx} allows (expected fewer, or a larger --ctx)")
        cache = self.backend.new_cache(self.n_ctx)
        return Generation(self.backend, self.tokenizer, ids, params, cache, self.prefill_chunk)

    def info(self) -> dict[str, Any]:
        cfg, src = self.config, self.source
        tok = self.tokenizer
        from runtime.backends.weight_stream import Q8_ACTIVATION_TYPES

        return {
            "path": str(src.path), "format": src.format, "name": cfg.name, "arch": cfg.arch,
            "parameters": src.n_params(), "layers": cfg.n_layers, "dim": cfg.dim,
            "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
            "ffn_dim": cfg.ffn_dim, "vocab_size": cfg.vocab_size,
            "context_length": cfg.context_length, "rope": {
                "theta": cfg.rope_theta, "style": cfg.rope_style,
                "scaling": cfg.rope_scaling.kind},
            "tied_embeddings": cfg.tied_embeddings,
            "tensor_bytes": src.bytes_by_type(),
            # like llama.cpp, products with these weights round their inputs to Q8_0 blocks
            "q8_activation_types": sorted(t.name for t in Q8_ACTIVATION_TYPES),
            "tokenizer": None if tok is None else {
                "kind": type(tok).__name__, "vocab_size": tok.vocab_size,
                "bos_id": tok.bos_id, "eos_id": tok.eos_id},
            "backend": self.backend.name, "backend_reason": self.backend_reason,
            "memory_plan": self.plan.as_dict(),
        }
