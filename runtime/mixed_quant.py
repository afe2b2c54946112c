"""Mixed-precision quantization: each weight matrix gets its own GGML type, chosen by how much
quantizing *that tensor alone* changes the model's output on calibration text, so the bytes go
where they buy the most accuracy.

0. Calibration statistics (with calibration text, unless turned off): the text is run once at
   full precision and, for every weight matrix, the second moments of its inputs are recorded:
   the mean squared input activation of each column (the importance matrix, the idea of
   llama.cpp's imatrix) and, unless turned off or too large, the whole Gram matrix E[x x^T].
   The encoders then fit each block's scale and min by least squares weighted per column with
   the importance (runtime/quant.py) and, given the Gram matrix, choose the levels so that the
   matrix's output error is least rather than each weight's (runtime/gptq.py), here and when
   writing.
1. Sensitivity: the calibration text is run once at full precision; then, for each 2-D tensor
   and each candidate type (F16, Q8_0, Q6_K, Q5_K, Q4_K, Q4_0, those whose block divides the
   row), the tensor is quantized and dequantized, the model is rerun from the layer that uses
   it (earlier layers' hidden states are reused), and the mean KL(full || quantized) of the
   next-token distributions is recorded (nats per token).
2. Plan: a multiple-choice knapsack. Assuming the losses add up across tensors, each tensor's
   options are cut to their lower convex hull (bytes against loss); starting from the largest
   option everywhere, the step that gives up the least loss per byte saved is taken until the
   size fits, then leftover bytes buy back the cheapest upgrades.
3. Write: a standard GGUF (the input's metadata, llama.cpp's tensor names and layouts; norms
   and biases stay F32), through a temporary file renamed at the end.
"""

from __future__ import annotations

import heapq
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T

from runtime import gptq
from runtime.errors import ModelError
from runtime.model_file import ModelSource, TensorRef, open_model
from runtime.perplexity import kl_divergence, log_softmax
from runtime.quant import SEARCHED, dequantize, quantize, row_bytes

CANDIDATES = (T.F16, T.Q8_0, T.Q6_K, T.Q5_K, T.Q4_K, T.Q4_0)
FLOAT_INPUTS = frozenset({T.F32, T.F16, T.BF16})
ALIGNMENT = 32  # GGUF's default data alignment: each tensor's data is padded to it


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    options: dict[T, int]  # type -> bytes
    loss: dict[T, float] = field(default_factory=dict)  # type -> KL when quantized alone
    choice: T = T.F16

    @property
    def n_weights(self) -> int:
        return int(np.prod(self.shape))

    def cost(self, qtype: T) -> int:
        """Bytes in the file: the tensor's data padded to GGUF's alignment."""
        return padded(self.options[qtype])


def padded(nbytes: int) -> int:
    return nbytes + (-nbytes) % ALIGNMENT


@dataclass
class Plan:
    tensors: list[TensorPlan]  # the 2-D tensors we choose for
    fixed_bytes: int  # 1-D tensors (norms, biases) and rows no block divides: F32
    overhead: int  # header, metadata, tensor table, and padding but the chosen tensors'
    n_weights: int  # every weight of the model, 1-D included
    limit: str  # what was asked, e.g. "--target-bpw 4.8"
    choice_budget: int  # bytes the chosen 2-D tensors may take
    calibration_tokens: int = 0
    imatrix: str | None = None  # where the importance weights came from; None: unweighted
    gptq: bool = False  # levels error-compensated under the inputs' Gram matrices (gptq.py)
    gptq_note: str = ""  # why not, when not

    @property
    def tensor_bytes(self) -> int:
        """Bytes of all tensor data: what bits per weight count, as llama.cpp does."""
        return sum(t.options[t.choice] for t in self.tensors) + self.fixed_bytes

    @property
    def file_bytes(self) -> int:
        """The written file's size."""
        return sum(t.cost(t.choice) for t in self.tensors) + self.fixed_bytes + self.overhead

    @property
    def bpw(self) -> float:
        return 8 * self.tensor_bytes / self.n_weights

    @property
    def predicted_kl(self) -> float:
        return sum(t.loss.get(t.choice, 0.0) for t in self.tensors)

    def fits(self) -> bool:
        return sum(t.cost(t.choice) for t in self.tensors) <= self.choice_budget

    def as_dict(self) -> dict[str, Any]:
        return {
            "limit": self.limit, "tensor_bytes": self.tensor_bytes,
            "file_bytes": self.file_bytes, "bpw": self.bpw,
            "predicted_kl": self.predicted_kl, "calibration_tokens": self.calibration_tokens,
            "imatrix": self.imatrix is not None, "imatrix_source": self.imatrix,
            "gptq": self.gptq, "gptq_note": self.gptq_note,
            "tensors": [{"name": t.name, "shape": list(t.shape), "type": t.choice.name,
                         "bytes": t.options[t.choice], "kl": t.loss.get(t.choice),
                         "kl_by_type": {q.name: v for q, v in t.loss.items()}}
                        for t in self.tensors],
        }


def candidate_types(shape: Sequence[int]) -> dict[T, int]:
    """The candidate types a tensor's rows allow (K-quants need rows of 256), with bytes."""
    if len(shape) != 2:
        return {}
    rows, cols = shape
    out = {}
    for qtype in CANDIDATES:
        try:
            out[qtype] = rows * row_bytes(qtype, cols)
        except ValueError:
            continue
    return out


# ------------------------------------------------------------------------------ sources

def open_float_source(path: Path, workdir: Path) -> ModelSource:
    """A GGUF (F32/F16/BF16 weights) as is; a Hugging Face directory converted to an F32
    GGUF in `workdir` first, so that tensors have llama.cpp's names and layouts."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such model file or directory")
    if path.is_dir():
        from runtime.convert import convert, tokenizer_metadata

        path = convert(path, workdir / "input-f32.gguf", T.F32,
                       tokenizer_metadata=tokenizer_metadata(path))
    source = open_model(path)
    for ref in source.tensors.values():
        if ref.qtype not in FLOAT_INPUTS:
            raise ModelError(f"{source.path}: tensor {ref.name} is already quantized "
                             f"({ref.qtype.name}); expected F32, F16 or BF16 weights to quantize "
                             "from (start from the F16/F32 model)")
    return source


def float_weights(source: ModelSource) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(ref.to_float32(), dtype=np.float32)
            for name, ref in source.tensors.items()}


def with_tensors(source: ModelSource, weights: Mapping[str, np.ndarray]) -> ModelSource:
    """The same model over in-memory float32 weights (no copies)."""
    refs = {n: TensorRef(n, T.F32, tuple(w.shape), w) for n, w in weights.items()}
    return replace(source, tensors=refs)


def encode(w: np.ndarray, qtype: T, importance: np.ndarray | None = None,
           gram: np.ndarray | None = None) -> np.ndarray:
    """`w` as the bytes of block type `qtype`: with the inputs' Gram matrix, error-compensated
    levels (runtime/gptq.py); else each block's scales fitted weighted by the column
    `importance` when given, and the weights rounded to nearest."""
    if gram is not None and qtype in SEARCHED:
        return gptq.quantize(w, qtype, gram)
    return quantize(w, qtype, importance=importance)


def round_trip(w: np.ndarray, qtype: T, importance: np.ndarray | None = None,
               gram: np.ndarray | None = None) -> np.ndarray:
    """What the runtime will compute with after `w` is stored as `qtype` (encoded as the file
    will be written)."""
    if qtype == T.F16:
        return w.astype(np.float16).astype(np.float32)
    return dequantize(encode(w, qtype, importance, gram), qtype, w.shape)


# -------------------------------------------------------------------------- sensitivity

_LAYER = re.compile(r"blk\.(\d+)\.")


def _layer_of(name: str, n_layers: int) -> int:
    """The first forward-pass stage a tensor affects: -1 embedding, n_layers the head."""
    if m := _LAYER.match(name):
        return int(m.group(1))
    return -1 if name == "token_embd.weight" else n_layers


class _Runner:
    """The numpy forward pass split by layer, so a run can restart from a stored layer input."""

    def __init__(self, source: ModelSource, ids: Sequence[int]):
        from runtime.backends.numpy_backend import NumpyBackend

        self.source, self.ids = source, list(ids)
        self.backend = NumpyBackend(source)
        self.n_layers = source.config.n_layers

    def layer(self, backend: Any, x: np.ndarray, i: int) -> np.ndarray:
        from runtime.backends.numpy_backend import rms_norm

        cfg, w, b = backend.config, backend.w, f"blk.{i}."
        cache = backend.new_cache(len(self.ids))
        x = x + backend.attention(rms_norm(x, w(b + "attn_norm.weight"), cfg.norm_eps), i, cache)
        return x + backend.mlp(rms_norm(x, w(b + "ffn_norm.weight"), cfg.norm_eps), i)

    def head(self, backend: Any, x: np.ndarray) -> np.ndarray:
        from runtime.backends.numpy_backend import rms_norm

        cfg, w = backend.config, backend.w
        x = rms_norm(x, w("output_norm.weight"), cfg.norm_eps)
        return w.matmul(x, "token_embd.weight" if cfg.tied_embeddings else "output.weight")

    def hidden_states(self) -> list[np.ndarray]:
        """xs[i]: the input of layer i; xs[n_layers]: the input of the head."""
        xs = [self.backend.embed(self.ids)]
        for i in range(self.n_layers):
            xs.append(self.layer(self.backend, xs[-1], i))
        return xs

    def logits_from(self, source: ModelSource, xs: list[np.ndarray], stage: int) -> np.ndarray:
        from runtime.backends.numpy_backend import NumpyBackend

        backend = NumpyBackend(source)
        x = backend.embed(self.ids) if stage < 0 else xs[stage]
        for i in range(max(stage, 0), self.n_layers):
            x = self.layer(backend, x, i)
        return self.head(backend, x)


class _ActivationRecorder:
    """Stands in for a backend's weight store: every `matmul(x, name)` adds x's squared entries
    per column to the sums of `name` (and, with `grams`, x^T x to its float32 Gram sum, while
    all of them fit GRAM_LIMIT; matrices fed the very same input, Q/K/V and gate/up, share
    one), then multiplies as the store does."""

    def __init__(self, store: Any, stats: dict[str, Any], grams: bool):
        self.store, self.stats, self.grams = store, stats, grams
        self.last: tuple[np.ndarray, str] | None = None

    def __call__(self, name: str) -> np.ndarray:
        return self.store(name)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.store, attr)

    def matmul(self, x: np.ndarray, name: str) -> np.ndarray:
        flat = x.reshape(-1, x.shape[-1])
        sums, rows, grams, alias = (self.stats[k] for k in ("sums", "rows", "grams", "alias"))
        sums[name] = sums.get(name, 0.0) + np.einsum("ij,ij->j", flat, flat, dtype=np.float64)
        rows[name] = rows.get(name, 0) + len(flat)
        if self.grams:
            if self.last is not None and self.last[0] is x:
                alias[name] = alias.get(self.last[1], self.last[1])
            else:
                self.last = (x, name)
                if name not in grams and name not in self.stats["sized"]:
                    self.stats["sized"].add(name)
                    self.stats["gram_bytes"] += 4 * flat.shape[1] ** 2
                    if self.stats["gram_bytes"] <= GRAM_LIMIT:
                        grams[name] = np.zeros((flat.shape[1],) * 2, np.float32)
                    else:
                        grams.clear()  # they will not all fit: none are kept
                if name in grams:
                    grams[name] += flat.T @ flat
        return self.store.matmul(x, name)


@dataclass
class Calibration:
    """Second moments of each weight matrix's inputs on calibration text: per column
    (`importance`) and, when recorded, the whole Gram matrix (`grams`; None with the bytes
    they would have needed in `gram_bytes` when those passed GRAM_LIMIT)."""

    importance: dict[str, np.ndarray]
    grams: dict[str, np.ndarray] | None = None
    gram_bytes: int = 0


GRAM_LIMIT = 4 << 30  # bytes of float32 Gram matrices kept at most; beyond, importance only


def calibration_stats(source: ModelSource, weights: dict[str, np.ndarray],
                      ids: Sequence[int], grams: bool = False) -> Calibration:
    """Per weight matrix, the mean squared input activation of each column (sum_t x_tj^2 / n)
    and with `grams` the mean of x x^T, over full-precision forward passes of `ids` in windows
    of the model's context (each from an empty cache). A matrix that never multiplies (an
    untied token embedding is looked up, not multiplied) has no entry and is encoded
    unweighted. A tied embedding gets no Gram matrix: its rows are also looked up as they are,
    a use that levels compensated for the head's inputs alone do not account for."""
    full, ctx = with_tensors(source, weights), source.config.context_length
    stats: dict[str, Any] = {"sums": {}, "rows": {}, "grams": {}, "alias": {}, "sized": set(),
                             "gram_bytes": 0}
    for start in range(0, len(ids), ctx):
        runner = _Runner(full, ids[start:start + ctx])
        runner.backend.w = _ActivationRecorder(runner.backend.w, stats, grams)
        runner.head(runner.backend, runner.hidden_states()[-1])
    rows = stats["rows"]
    importance = {name: total / rows[name] for name, total in stats["sums"].items()}
    if not grams or stats["gram_bytes"] > GRAM_LIMIT:
        return Calibration(importance, None, stats["gram_bytes"])
    means = {name: g / np.float32(rows[name]) for name, g in stats["grams"].items()}
    means.update({name: means[first] for name, first in stats["alias"].items()})
    means.pop("token_embd.weight", None)
    return Calibration(importance, means, stats["gram_bytes"])


def importance_matrix(source: ModelSource, weights: dict[str, np.ndarray],
                      ids: Sequence[int]) -> dict[str, np.ndarray]:
    """`calibration_stats`' per-column importance alone."""
    return calibration_stats(source, weights, ids).importance


def measure_sensitivity(source: ModelSource, weights: dict[str, np.ndarray],
                        plans: list[TensorPlan], ids: Sequence[int],
                        progress: Callable[[str], None] | None = None,
                        importance: Mapping[str, np.ndarray] | None = None,
                        grams: Mapping[str, np.ndarray] | None = None) -> None:
    """Fill each plan's `loss`: mean KL(full || this tensor alone quantized) over `ids`, each
    tensor encoded as it will be written (with its column `importance` and Gram matrix when
    given)."""
    full = with_tensors(source, weights)
    runner = _Runner(full, ids)
    xs = runner.hidden_states()
    base = log_softmax(runner.head(runner.backend, xs[-1]))
    tied = source.config.tied_embeddings
    for k, plan in enumerate(plans):
        stage = _layer_of(plan.name, runner.n_layers)
        if tied and plan.name == "token_embd.weight":
            stage = -1  # the embedding is the head too: everything reruns
        w, imp = weights[plan.name], (importance or {}).get(plan.name)
        gram = (grams or {}).get(plan.name)
        for qtype in plan.options:
            variant = with_tensors(source, {**weights, plan.name: round_trip(w, qtype, imp,
                                                                             gram)})
            logp = log_softmax(runner.logits_from(variant, xs, stage))
            plan.loss[qtype] = float(kl_divergence(base, logp).mean())
        if progress:
            progress(f"[{k + 1}/{len(plans)}] {plan.name}: " + ", ".join(
                f"{q.name} {v:.2e}" for q, v in plan.loss.items()))


# ------------------------------------------------------------------------------ the plan

def _hull(plan: TensorPlan) -> list[T]:
    """The tensor's useful options from largest to smallest: an option is dropped when a
    smaller one loses no more, then the rest are cut to the lower convex hull of (bytes, loss),
    so each step down costs at least as much loss per byte saved as the one before."""
    size, loss = {q: plan.cost(q) for q in plan.options}, plan.loss
    kept: list[T] = []
    for q in sorted(size, key=lambda q: (size[q], loss[q])):  # smallest first
        if not kept or loss[q] < loss[kept[-1]]:
            kept.append(q)
    kept.reverse()

    def slope(a: T, b: T) -> float:
        return (loss[b] - loss[a]) / (size[a] - size[b])

    hull: list[T] = []
    for q in kept:
        while len(hull) >= 2 and slope(hull[-2], hull[-1]) > slope(hull[-1], q):
            hull.pop()  # the middle option lies above the line joining its neighbours
        hull.append(q)
    return hull


def choose(plans: list[TensorPlan], budget_for_choices: int) -> None:
    """Set each plan's `choice` so the bytes fit `budget_for_choices` with the least summed
    loss (greedy on the convex hulls, then spend what is left on the best upgrades)."""
    hulls = {p.name: _hull(p) for p in plans}
    at = {p.name: 0 for p in plans}
    for p in plans:
        p.choice = hulls[p.name][0]
    total = sum(p.cost(p.choice) for p in plans)
    heap: list[tuple[float, int, str]] = []
    by_name = {p.name: p for p in plans}

    def push(p: TensorPlan) -> None:
        h, i = hulls[p.name], at[p.name]
        if i + 1 < len(h):
            a, b = h[i], h[i + 1]
            slope = (p.loss[b] - p.loss[a]) / (p.cost(a) - p.cost(b))
            heapq.heappush(heap, (slope, len(heap), p.name))

    for p in plans:
        push(p)
    while total > budget_for_choices and heap:
        _, _, name = heapq.heappop(heap)
        p = by_name[name]
        at[name] += 1
        nxt = hulls[name][at[name]]
        total -= p.cost(p.choice) - p.cost(nxt)
        p.choice = nxt
        push(p)
    while True:  # leftover bytes: the upgrade that removes the most loss and still fits
        best = None
        for p in plans:
            for q in p.options:
                extra = p.cost(q) - p.cost(p.choice)
                gain = p.loss[p.choice] - p.loss[q]
                if 0 < extra <= budget_for_choices - total and gain > 0 and \
                        (best is None or gain > best[0]):
                    best = (gain, p, q, extra)
        if best is None:
            break
        _, p, q, extra = best
        p.choice, total = q, total + extra


def make_plan(source: ModelSource, *, target_bpw: float | None = None,
              max_bytes: int | None = None, header_bytes: int = 0) -> Plan:
    """The tensors to choose for and their byte budget: `target_bpw` bounds the tensor data
    (bits per weight as llama.cpp counts them), `max_bytes` the whole file. A ModelError says
    when even the smallest types cannot meet it."""
    if (target_bpw is None) == (max_bytes is None):
        raise ModelError("give exactly one of --target-bpw and --max-bytes")
    plans, fixed, n_weights = [], 0, 0
    overhead = padded(header_bytes)  # the data section starts aligned
    for name, ref in source.tensors.items():
        n_weights += int(np.prod(ref.shape))
        options = candidate_types(ref.shape)
        if options:
            plans.append(TensorPlan(name, tuple(ref.shape), options))
        else:
            fixed += int(np.prod(ref.shape)) * 4
            overhead += padded(int(np.prod(ref.shape)) * 4) - int(np.prod(ref.shape)) * 4
    if target_bpw is not None:
        if not 0 < target_bpw <= 32:
            raise ModelError(f"--target-bpw {target_bpw:g} is out of range (expected more than "
                             "0 and at most 32 bits per weight)")
        limit, budget = f"--target-bpw {target_bpw:g}", int(target_bpw * n_weights / 8) - fixed
    else:
        assert max_bytes is not None
        limit, budget = f"--max-bytes {max_bytes}", max_bytes - overhead - fixed
    plan = Plan(plans, fixed, overhead, n_weights, limit, budget)
    smallest = sum(min(p.cost(q) for q in p.options) for p in plans)
    if budget < smallest:
        least = sum(min(p.options.values()) for p in plans) + fixed
        raise ModelError(f"{limit} cannot be met: the smallest this model gets with "
                         f"{', '.join(q.name for q in CANDIDATES)} is {least:,} bytes of tensors "
                         f"({8 * least / n_weights:.2f} bits per weight), "
                         f"{smallest + fixed + overhead:,} "
                         "bytes of file; expected a target at least that large")
    return plan


# -------------------------------------------------------------------------------- writing

def imatrix_metadata(dataset: str, importance: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The quantize.imatrix.* keys llama.cpp's own quantizer writes when it used an imatrix
    (the calibration file's name and how many matrices had one); llama.cpp reads past them."""
    return {"quantize.imatrix.dataset": dataset,
            "quantize.imatrix.entries_count": len(importance)}


def _copy_metadata(writer: Any, path: Path, file_type: int,
                   extra: Mapping[str, Any] | None = None) -> None:
    """Every key of the input GGUF except those the writer or the new file type own, then
    `extra` (str or int values)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    skip = {"general.architecture", "general.file_type", "general.quantization_version",
            "general.alignment"}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or key in skip or key in (extra or {}):
            continue
        vtype = fld.types[0]
        sub = fld.types[-1] if vtype == GGUFValueType.ARRAY else None
        value = fld.contents()
        writer.add_key_value(key, value, vtype, sub_type=sub)
    writer.add_file_type(file_type)
    writer.add_quantization_version(2)  # GGML_QNT_VERSION: the block layouts of today
    for key, value in (extra or {}).items():
        (writer.add_string if isinstance(value, str) else writer.add_int32)(key, value)


def header_bytes(source: ModelSource, extra: Mapping[str, Any] | None = None) -> int:
    """Bytes of the GGUF header, metadata and tensor table that `write` will produce."""
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "header.gguf"
        writer = gguf.GGUFWriter(path, source.config.arch)
        _copy_metadata(writer, source.path, 1, extra)
        for name, ref in source.tensors.items():
            writer.add_tensor_info(name, ref.shape, np.dtype(np.float32), 0, raw_dtype=T.F32)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        return path.stat().st_size


def write(source: ModelSource, weights: Mapping[str, np.ndarray], types: Mapping[str, T],
          out: Path, importance: Mapping[str, np.ndarray] | None = None,
          extra: Mapping[str, Any] | None = None,
          grams: Mapping[str, np.ndarray] | None = None) -> Path:
    """A GGUF with each 2-D tensor in `types[name]` (others F32), via a temporary file; block
    types are encoded with the tensor's column `importance` and Gram matrix when it has them
    (`encode`), and `extra` metadata keys are added."""

    from runtime.convert import FILE_TYPES, add_typed_tensor, gguf_output

    out = Path(out)
    totals: dict[T, int] = {}
    for name, qtype in types.items():
        totals[qtype] = totals.get(qtype, 0) + int(np.prod(weights[name].shape))
    main = max(totals, key=lambda q: totals[q]) if totals else T.F32
    with gguf_output(out, source.config.arch) as writer:
        _copy_metadata(writer, source.path, FILE_TYPES.get(main, 1), extra)
        for name in source.tensors:
            qtype, w = types.get(name, T.F32), weights[name]
            if qtype in (T.F32, T.F16):
                add_typed_tensor(writer, name, w, qtype)
            else:
                writer.add_tensor(name, encode(w, qtype, (importance or {}).get(name),
                                               (grams or {}).get(name)), raw_dtype=qtype)
    return out


def uniform_types(source: ModelSource, qtype: T) -> dict[str, T]:
    """Every 2-D tensor in `qtype`, falling back (Q8_0, then F16) where its block does not fit."""
    out = {}
    for name, ref in source.tensors.items():
        options = candidate_types(ref.shape)
        if options:
            out[name] = next(q for q in (qtype, T.Q8_0, T.F16) if q in options)
    return out


# ---------------------------------------------------------------------------- the command

IMATRIX_TOKENS = 8192  # the most calibration tokens the importance matrix is averaged over


def calibration_ids(source: ModelSource, text: str, n_tokens: int | None, where: str
                    ) -> list[int]:
    """The first `n_tokens` of the text (at most one context: the sensitivity runs), or with
    None the first IMATRIX_TOKENS (the importance matrix, over several windows)."""
    if source.load_tokenizer is None:
        raise ModelError(f"{source.path}: no tokenizer in the model (needed for calibration)")
    ids = source.load_tokenizer().encode(text, parse_special=False)
    if len(ids) < 16:
        raise ModelError(f"{where}: only {len(ids)} tokens of calibration text (expected at "
                         "least 16; a few hundred give a steadier plan)")
    if n_tokens is None:
        return ids[:IMATRIX_TOKENS]
    return ids[:min(n_tokens, source.config.context_length)]


def default_calibration(source: ModelSource) -> str:
    """Without --calibration: text made from the model's own vocabulary, so the plan still
    weighs tensors by their effect on real token sequences (a stated fallback, weaker)."""
    tok = source.load_tokenizer() if source.load_tokenizer else None
    if tok is None:
        raise ModelError(f"{source.path}: no tokenizer in the model (needed for calibration)")
    rng = np.random.default_rng(0)
    pieces = [tok.decode([int(i)]) for i in rng.integers(0, tok.vocab_size, 2048)]
    return "".join(p for p in pieces if p.isprintable())


def quantize_model(src: Path, out: Path | None, *, target_bpw: float | None = None,
                   max_bytes: int | None = None, calibration: Path | None = None,
                   calibration_tokens: int = 256, imatrix: bool = True, gptq: bool = True,
                   progress: Callable[[str], None] | None = None) -> Plan:
    """Measure, plan and (unless `out` is None) write; returns the plan. With `calibration`
    text and `imatrix`, the encoders weight each column by its importance on that text, and
    with `gptq` also compensate each rounding's error under the inputs' Gram matrices, when
    those fit GRAM_LIMIT (the vocabulary-drawn fallback text is no basis for either, so it
    never gets them)."""
    if out is not None and not Path(out).parent.is_dir():
        raise ModelError(f"{out}: folder {Path(out).parent} does not exist (expected the output "
                         "file's folder to exist)")
    if calibration is not None:
        try:
            text = Path(calibration).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ModelError(f"--calibration {calibration}: no such file (expected a UTF-8 "
                             "text file)") from None
        except (UnicodeDecodeError, IsADirectoryError) as e:
            raise ModelError(f"--calibration {calibration}: not a UTF-8 text file "
                             f"({type(e).__name__})") from None
    with tempfile.TemporaryDirectory(prefix="claw-quantize-") as tmp:
        source = open_float_source(Path(src), Path(tmp))
        if calibration is None:
            text = default_calibration(source)
        ids = calibration_ids(source, text, calibration_tokens, str(calibration))
        weights = float_weights(source)
        stats, extra = Calibration({}), None
        note = ("--no-gptq" if not gptq else "needs --calibration" if calibration is None
                else "--no-imatrix" if not imatrix else "")
        if imatrix and calibration is not None:
            imatrix_ids = calibration_ids(source, text, None, str(calibration))
            stats = calibration_stats(source, weights, imatrix_ids, grams=gptq)
            if gptq and stats.grams is None:
                note = (f"its Gram matrices would take {stats.gram_bytes:,} bytes, over the "
                        f"limit of {GRAM_LIMIT:,}")
            extra = imatrix_metadata(Path(calibration).name, stats.importance)
        plan = make_plan(source, target_bpw=target_bpw, max_bytes=max_bytes,
                         header_bytes=header_bytes(source, extra))
        plan.calibration_tokens = len(ids)
        if extra is not None:
            plan.imatrix = f"{Path(calibration).name}, {len(imatrix_ids)} tokens"
        plan.gptq, plan.gptq_note = stats.grams is not None, note
        importance = stats.importance or None
        measure_sensitivity(source, weights, plan.tensors, ids, progress, importance,
                            stats.grams)
        choose(plan.tensors, plan.choice_budget)
        assert plan.fits(), "the knapsack left the plan over its budget"
        if out is not None:
            write(source, weights, {t.name: t.choice for t in plan.tensors}, out, importance,
                  extra, stats.grams)
    return plan
