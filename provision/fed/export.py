"""Merge a federated run's LoRA adapter into its base GGUF and write a deployable GGUF.

For each adapted Linear (HF name, e.g. `model.layers.3.self_attn.q_proj`) peft computes
y = W x + s·B(A x) with s = alpha/r (alpha/sqrt(r) with rsLoRA); merging folds it into the
weight, W' = W + s·(B @ A), exactly what peft's `merge_and_unload()` does. The GGUF stores
Llama's q/k rows permuted for llama.cpp's RoPE, so their deltas are permuted the same way
(`runtime.convert.permute_for_llama_cpp`). Base tensors are dequantized by the runtime's
reader, the merged model is written through the quantizer's writer (the base's metadata and
tokenizer copied, temp file + rename) as F32/F16, one uniform type, or a mixed-precision plan
at a bits-per-weight target. numpy only: exporting needs no torch.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from provision.errors import BadInput
from provision.fed.runs import Adapter, Run, file_sha256, find_run, read_adapter, read_run
from runtime.model_file import ModelSource, gguf_name, open_model

EXPORT_TYPES = (T.F32, T.F16, T.Q8_0, T.Q6_K, T.Q5_K, T.Q4_K, T.Q4_0)
# The Linear layers a Llama's LoRA adapts, by their GGUF names (HF q_proj … down_proj)
MERGEABLE = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
             "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")


@dataclass
class ExportResult:
    run_id: str
    output: Path
    file_bytes: int
    tensor_bytes: int
    n_weights: int
    merged: list[str]  # GGUF tensors that received a LoRA delta
    types: dict[str, int]  # GGML type name -> tensors of that type in the output

    @property
    def bpw(self) -> float:
        """Bits per weight of the tensor data, as llama.cpp counts them."""
        return 8 * self.tensor_bytes / self.n_weights

    def as_dict(self) -> dict[str, object]:
        return {"run": self.run_id, "output": str(self.output), "file_bytes": self.file_bytes,
                "tensor_bytes": self.tensor_bytes, "n_weights": self.n_weights,
                "bpw": self.bpw, "merged": self.merged, "types": self.types}


def export_type(name: str) -> T:
    """`--quantize NAME` as a GGML type among those the quantizer writes."""
    by_name = {t.name: t for t in EXPORT_TYPES}
    wanted = name.upper()
    if wanted not in by_name:
        raise BadInput(f"--quantize {name!r} is not supported (expected one of: "
                       f"{', '.join(by_name)})")
    return by_name[wanted]


def base_model(run: Run, override: Path | None) -> Path:
    """The base GGUF the run trained on: run.json's `model` (or `--model`), checked against
    its recorded sha256 so an adapter is never merged into other weights."""
    path = override or run.model
    where = "--model" if override else f"{run.dir / 'run.json'}: field 'model'"
    if not path.is_file():
        raise BadInput(f"{where}: {path} does not exist (expected the base GGUF the run "
                       "trained on; pass --model PATH if it moved)")
    digest = file_sha256(path)
    if digest != run.model_sha256.lower():
        raise BadInput(f"{where}: {path} has sha256 {digest[:16]}…, the run trained on "
                       f"{run.model_sha256[:16]}… (expected the same base model)")
    return path


def lora_deltas(adapter: Adapter, source: ModelSource) -> dict[str, np.ndarray]:
    """s·(B @ A) per adapted module, under llama.cpp's tensor name and in its row order."""
    from runtime.convert import permute_for_llama_cpp

    weights = adapter.dir / "adapter_model.safetensors"
    cfg = source.config
    out = {}
    for module, (a, b) in adapter.pairs.items():
        name = gguf_name(module + ".weight")
        if name is None or not name.endswith(MERGEABLE) or name not in source.tensors:
            raise BadInput(f"{weights}: module {module} is not a weight of {source.path} "
                           "(expected q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj or "
                           "down_proj of model.layers.N)")
        shape = tuple(source.tensors[name].shape)
        if (b.shape[0], a.shape[1]) != shape:
            raise BadInput(f"{weights}: module {module}: lora_B @ lora_A is "
                           f"{b.shape[0]}×{a.shape[1]}, the model's {name} is "
                           f"{shape[0]}×{shape[1]} (expected an adapter trained on this model)")
        delta = adapter.scale(module, a.shape[0]) * (b.astype(np.float64) @ a.astype(np.float64))
        if cfg.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            delta = permute_for_llama_cpp(delta, cfg.n_heads if "attn_q" in name
                                          else cfg.n_kv_heads)
        out[name] = delta.astype(np.float32)
    return out


def merge(source: ModelSource, adapter: Adapter) -> tuple[dict[str, np.ndarray], list[str]]:
    """Every tensor of the model as float32, the adapted ones with their delta added; and the
    names of those."""
    from runtime.mixed_quant import float_weights

    deltas = lora_deltas(adapter, source)
    weights = float_weights(source)
    for name, delta in deltas.items():
        weights[name] = weights[name] + delta
    return weights, sorted(deltas)


def export_run(run_ref: str | Path, output: Path, *, quantize: str | None = None,
               target_bpw: float | None = None, calibration: Path | None = None,
               model: Path | None = None, allow_unfinished: bool = False,
               progress: Callable[[str], None] | None = None) -> ExportResult:
    """Merge run `run_ref`'s adapter into its base model and write `output`."""
    from runtime.mixed_quant import quantize_model, uniform_types, with_tensors, write

    say = progress or (lambda line: None)
    if quantize is not None and target_bpw is not None:
        raise BadInput("give at most one of --quantize and --target-bpw")
    if calibration is not None and target_bpw is None:
        raise BadInput("--calibration is used only with --target-bpw (the mixed-precision plan "
                       "is measured on it)")
    qtype = export_type(quantize) if quantize is not None else T.F16
    output = Path(output)
    if not output.parent.is_dir():
        raise BadInput(f"-o {output}: folder {output.parent} does not exist (expected the "
                       "output file's folder to exist)")
    run = read_run(find_run(run_ref))
    if run.status != "succeeded" and not allow_unfinished:
        raise BadInput(f"{run.dir / 'run.json'}: run {run.id} is {run.status} (expected "
                       "succeeded; --allow-unfinished exports its last aggregated adapter)")
    adapter = read_adapter(run.dir)
    base = base_model(run, model)
    say(f"base {base} ({run.model_sha256[:12]}…), adapter {adapter.dir} "
        f"({len(adapter.pairs)} modules, r={next(iter(adapter.pairs.values()))[0].shape[0]})")
    source = open_model(base)
    weights, merged = merge(source, adapter)
    say(f"merged {len(merged)} tensors")
    merged_source = with_tensors(source, weights)
    if target_bpw is None:
        types = {} if qtype == T.F32 else uniform_types(merged_source, qtype)
        say(f"writing {output} ({qtype.name})")
        write(merged_source, weights, types, output)
    else:
        with tempfile.TemporaryDirectory(prefix=".claw-fed-export-", dir=output.parent) as tmp:
            f32 = Path(tmp) / "merged-f32.gguf"
            say(f"writing the merged F32 model, then quantizing to {target_bpw:g} bits/weight")
            write(merged_source, weights, {}, f32)
            quantize_model(f32, output, target_bpw=target_bpw, calibration=calibration,
                           progress=progress)
    written = open_model(output)  # the file the runtime will load, checked like any model
    types: dict[str, int] = {}
    for ref in written.tensors.values():
        types[ref.qtype.name] = types.get(ref.qtype.name, 0) + 1
    return ExportResult(run.id, output, output.stat().st_size,
                        sum(ref.nbytes for ref in written.tensors.values()), written.n_params(),
                        merged, types)
