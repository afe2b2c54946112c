"""The base model in torch, its LoRA adapter, and the adapter as the ndarray list Flower sends.

transformers reads our GGUF files itself (`from_pretrained(..., gguf_file=...)`), undoing
llama.cpp's q/k row permutation, so the torch model is the runtime's model (a unit test
compares logits with the numpy backend). Only the adapter's tensors travel: their names are
peft's own state-dict keys, so the server can write them in `save_pretrained` format.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.files import publish

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGETS)

    def as_dict(self) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.alpha, "target_modules": list(self.target_modules)}

    def peft_config(self, base: str | None = None) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=0.0,
                          target_modules=list(self.target_modules), task_type="CAUSAL_LM",
                          base_model_name_or_path=base)


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def load_base(gguf_path: str | os.PathLike[str]) -> tuple[Any, Any]:
    """(LlamaForCausalLM in float32, its tokenizer), both read from the GGUF file."""
    import torch
    import transformers

    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file (expected a GGUF file)")
    transformers.logging.set_verbosity_error()
    folder, name = str(path.parent), path.name
    model = transformers.LlamaForCausalLM.from_pretrained(folder, gguf_file=name,
                                                          dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.eval()
    return model, tokenizer


def with_lora(base: Any, lora: LoraSettings, seed: int = 0) -> Any:
    """The base wrapped with a fresh adapter; the seed makes every node's initial A the same."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(base, lora.peft_config())


def adapter_state(model: Any) -> dict[str, np.ndarray]:
    """peft's adapter keys (as `save_pretrained` writes them) → float32 arrays, sorted."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return {k: state[k].detach().cpu().numpy().astype(np.float32) for k in sorted(state)}


def get_adapter(model: Any) -> list[np.ndarray]:
    return list(adapter_state(model).values())


def check_shapes(expected: list[tuple[int, ...]], arrays: list[np.ndarray]) -> str | None:
    """None when `arrays` fits `expected`, else one line saying where it does not."""
    if len(arrays) != len(expected):
        return f"{len(arrays)} arrays (expected {len(expected)})"
    for i, (a, shape) in enumerate(zip(arrays, expected, strict=True)):
        if tuple(a.shape) != tuple(shape):
            return f"array {i} has shape {tuple(a.shape)} (expected {tuple(shape)})"
    return None


def set_adapter(model: Any, arrays: list[np.ndarray]) -> None:
    import torch
    from peft import set_peft_model_state_dict

    state = adapter_state(model)
    problem = check_shapes([a.shape for a in state.values()], arrays)
    if problem:
        raise ValueError(f"adapter update: {problem}")
    set_peft_model_state_dict(model, {k: torch.from_numpy(np.asarray(a, dtype=np.float32))
                                      for k, a in zip(state, arrays, strict=True)})


def _replace(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_adapter(folder: str | os.PathLike[str], names: list[str], arrays: list[np.ndarray],
                 lora: LoraSettings, base: str | None = None) -> Path:
    """Write peft's `save_pretrained` layout (config + safetensors), each file temp + rename."""
    from safetensors.numpy import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    config = lora.peft_config(base).to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    _replace(out / "adapter_config.json",
             lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, default=str)))
    tensors = {n: np.ascontiguousarray(a, dtype=np.float32)
               for n, a in zip(names, arrays, strict=True)}
    _replace(out / "adapter_model.safetensors", lambda tmp: save_file(tensors, tmp))
    return out
