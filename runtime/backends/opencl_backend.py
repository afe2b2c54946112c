"""The OpenCL backend: the numpy backend's forward pass, kernel for kernel, on an OpenCL device.

Weights are uploaded once as their GGUF blocks (wrapped in place on unified-memory devices);
activations, the KV cache and the logits stay on the device between kernels, and the host only
writes the token ids and reads the logits (or, for greedy decoding, one token id). The K and V
projections write straight into the cache and the output projections add into the residual
stream, so a layer is 13-15 kernel launches and no copies; a decode step fuses Q/K/V into one
launch and gate/up/SwiGLU into another on CPU-shaped devices (9 launches a layer). Decode
steps are recorded once per cache (and attention split count) and replayed (opencl_replay):
the same launches without pyopencl's per-call argument handling, which on a 2-core CPU device
cost more host time than the kernels.

Under a memory plan that streams (`--memory-budget`, planned with `backend="opencl"`), the
resident units are uploaded as above and the streamed ones go through a ring of device buffers
(`opencl_ring.DeviceRing`): the next streamed unit uploads while the current one computes, and
embedding rows are looked up on the host, so the table is never uploaded whole.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from runtime.backends import Backend, KVCache
from runtime.backends.opencl_device import Device, find_device
from runtime.backends.opencl_kernels import FORMATS, DeviceMatrix, Kernels, Params
from runtime.backends.opencl_programs import ProgramCache
from runtime.backends.opencl_replay import PerStep, Recording, position
from runtime.backends.opencl_tuning import load_params
from runtime.backends.weight_stream import Q8_ACTIVATION_TYPES
from runtime.config import ModelConfig
from runtime.errors import ModelError
from runtime.memory_plan import Plan
from runtime.model_file import ModelSource


def int8_input(layer: dict[str, Any], *names: str) -> bool:
    """Whether one of these products rounds its input to Q8_0 (quantized weights), so that
    the RMSNorm before them writes the rounded copy too."""
    return any(isinstance(m := layer.get(n), DeviceMatrix) and m.qtype in Q8_ACTIVATION_TYPES
               for n in names)


MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


class DeviceKVCache(KVCache):
    """Keys and values on the device: per layer one (n_ctx, kv_heads, head_dim) float32 buffer."""

    def __init__(self, cfg: ModelConfig, n_ctx: int, kern: Kernels):
        self.n_ctx, self.length = n_ctx, 0
        per_layer = n_ctx * cfg.n_kv_heads * cfg.head_dim * 4
        if per_layer > kern.dev.max_alloc:
            raise ModelError(f"a KV cache of {n_ctx} positions needs {per_layer:,} bytes per "
                             f"layer, more than the device's largest buffer "
                             f"({kern.dev.max_alloc:,}); expected a smaller --ctx")
        self.k = [kern.empty(per_layer) for _ in range(cfg.n_layers)]
        self.v = [kern.empty(per_layer) for _ in range(cfg.n_layers)]
        self.nbytes = 2 * cfg.n_layers * per_layer
        self.recorded: tuple[tuple, Recording] | None = None  # (its key, the decode step)


class OpenCLBackend(Backend):
    name = "opencl"

    def __init__(self, source: ModelSource, *, device: Device | None = None,
                 params: Params | None = None, programs: ProgramCache | None = None,
                 plan: Plan | None = None):
        """`plan`: a memory plan made with backend="opencl"; its streamed units go through a
        ring of device buffers (without one, or without a budget, every weight is uploaded)."""
        super().__init__(source)
        start = time.perf_counter()
        self.dev = device or find_device()
        self.programs = programs or ProgramCache(self.dev)
        self.params, self.params_from = (params, "given") if params else load_params(self.dev)
        self.kern = Kernels(self.dev, self.params, self.programs)
        self.compile_seconds = time.perf_counter() - start
        cfg = self.config
        if cfg.head_dim % 4 or cfg.head_dim > 256:
            raise ModelError(f"head_dim {cfg.head_dim} has no OpenCL attention kernel "
                             "(expected a multiple of 4, at most 256)")
        self.plan = plan if plan is not None and plan.budget is not None else None
        if self.plan is not None and self.plan.backend != "opencl":
            raise ModelError("the OpenCL backend needs a memory plan made for it "
                             "(make_plan(..., backend='opencl'))")
        self.streamed = {i for i, u in enumerate(self.plan.units) if u.tier == "stream"} \
            if self.plan else set()
        self.ring = None
        if self.streamed:
            from runtime.backends.opencl_ring import DeviceRing

            self.ring = DeviceRing(self.kern, source, self.plan)
        self.layers = [self._upload_layer(i, i not in self.streamed)
                       for i in range(cfg.n_layers)]
        self.output_norm = self._vector("output_norm.weight")
        head_name = "token_embd.weight" if cfg.tied_embeddings else "output.weight"
        self.head = None if cfg.n_layers in self.streamed else self._matrix(head_name)
        # the embedding table on the device, unless the plan streams: then rows come from the
        # host (the table is then not a resident unit, or it is the streamed head)
        self.embd = (self.head if cfg.tied_embeddings else self._matrix("token_embd.weight")) \
            if not self.streamed else self.head if cfg.tied_embeddings else None
        resident = [m for layer in self.layers for m in layer.values()
                    if isinstance(m, DeviceMatrix)] + [self.embd, self.head]
        self.weight_bytes = sum(m.nbytes for m in {id(m): m for m in resident if m}.values())
        from runtime.backends.numpy_backend import rope_inv_freq

        factors = source.tensors.get("rope_freqs.weight")
        self.inv_freq = rope_inv_freq(cfg, factors.to_float32() if factors is not None else None)
        self.rope_positions = 0
        self.scratch_tokens = 0
        self.scratch_generation = 0  # bumped when buffers a recorded step reads are replaced
        self.replay = True  # decode steps replay a recording (opencl_replay); False: launch each
        self.part, self.part_bytes = None, 0
        self.caches: weakref.WeakSet[DeviceKVCache] = weakref.WeakSet()  # live, for memory_in_use
        self.dev.queue.finish()
        self.load_seconds = time.perf_counter() - start

    # --- weights --------------------------------------------------------------------------

    def _matrix(self, name: str) -> DeviceMatrix:
        ref = self.source.tensors[name]
        if ref.qtype not in FORMATS:
            raise ModelError(f"{name} is {ref.qtype.name}, which the OpenCL backend cannot read "
                             f"(expected one of {', '.join(t.name for t in FORMATS)}); "
                             "use --backend numpy")
        wrapped = self.kern.host_pointer_bytes
        try:
            matrix = self.kern.upload_matrix(ref.raw, ref.qtype, ref.shape)
        except ValueError as e:
            raise ModelError(f"{name}: {e} (the OpenCL kernels read 32-weight chunks); use "
                             "--backend numpy") from None
        if self.kern.host_pointer_bytes == wrapped:
            # copied (to a GPU, a CPU device's repacked or aligned copy): the file's pages need
            # not stay in this process beside the copy; under a budget they leave the page
            # cache too (a cgroup charges it), else it keeps them for the next start
            from runtime.backends.weight_stream import release_pages

            release_pages(ref, drop_cache=self.plan is not None)
        return matrix

    def _vector(self, name: str) -> Any:
        ref = self.source.tensors[name]
        values = self.ring.rows(ref, 0, 1) if self.ring else ref.to_float32()
        return self.kern.upload(values.reshape(-1))

    def _upload_layer(self, i: int, matrices: bool = True) -> dict[str, Any]:
        """Layer i's norms and biases, and its matrices unless they stream."""
        b = f"blk.{i}."
        layer: dict[str, Any] = {m: self._matrix(b + m + ".weight") for m in MATRICES} \
            if matrices else {}
        layer["attn_norm"] = self._vector(b + "attn_norm.weight")
        layer["ffn_norm"] = self._vector(b + "ffn_norm.weight")
        if self.config.qkv_bias:
            for m in ("attn_q", "attn_k", "attn_v"):
                layer[m + ".bias"] = self._vector(b + m + ".bias")
        return layer

    # --- device state ---------------------------------------------------------------------

    def new_cache(self, n_ctx: int) -> DeviceKVCache:
        self._rope_tables(n_ctx)
        cache = DeviceKVCache(self.config, n_ctx, self.kern)
        self.caches.add(cache)
        return cache

    def _rope_tables(self, n_ctx: int) -> None:
        """cos/sin of position x frequency, computed in float64 as numpy does, for n_ctx rows."""
        if n_ctx <= self.rope_positions:
            return
        cfg = self.config
        positions = np.arange(n_ctx, dtype=np.float64)
        if cfg.rope_scaling.kind == "linear":
            positions = positions / cfg.rope_scaling.factor
        angles = positions[:, None] * self.inv_freq[None, :]
        self.cos = self.kern.upload(np.cos(angles).astype(np.float32))
        self.sin = self.kern.upload(np.sin(angles).astype(np.float32))
        self.rope_positions = n_ctx
        self.scratch_generation += 1

    def _scratch(self, n_tok: int, n_keys: int) -> None:
        """Activation buffers for n_tok tokens (grown, never shrunk) and attention partials."""
        cfg, k = self.config, self.kern
        if n_tok > self.scratch_tokens:
            qd = cfg.n_heads * cfg.head_dim
            self.x, self.xn = k.empty(4 * n_tok * cfg.dim), k.empty(4 * n_tok * cfg.dim)
            self.q, self.att = k.empty(4 * n_tok * qd), k.empty(4 * n_tok * qd)
            self.gate, self.up = k.empty(4 * n_tok * cfg.ffn_dim), k.empty(4 * n_tok * cfg.ffn_dim)
            self.logits = k.empty(4 * n_tok * cfg.vocab_size)
            self.token_buf = k.empty(4 * n_tok)
            self.next_id = k.empty(4)
            self.scratch_tokens = n_tok
            self.scratch_generation += 1
        # split (decode) attention's partial results; prefill attention needs none
        splits = k.attention_splits(n_keys) if n_tok == 1 else 0
        need = 4 * cfg.n_heads * splits * (cfg.head_dim + 2)
        if need > self.part_bytes:
            self.part = k.empty(need)
            self.part_bytes = need
            self.scratch_generation += 1

    # --- the forward pass -----------------------------------------------------------------

    def forward(self, tokens: Sequence[int], cache: KVCache, *,
                all_logits: bool = False) -> np.ndarray:
        n_out = self.forward_device(tokens, cache, all_logits=all_logits)
        return self.kern.read(self.logits, (n_out, self.config.vocab_size))

    def forward_device(self, tokens: Sequence[int], cache: KVCache, *,
                       all_logits: bool = False) -> int:
        """Run the forward pass leaving the logits on the device (self.logits); returns rows."""
        self.check_room(tokens, cache)
        if not isinstance(cache, DeviceKVCache):
            raise ModelError("the OpenCL backend needs a cache from its own new_cache()")
        n, pos0 = len(tokens), cache.length
        self._rope_tables(cache.n_ctx)
        self._scratch(n, pos0 + n)
        cl, queue = self.dev.cl, self.dev.queue
        if self.embd is not None and len(self.embd.parts) == 1:
            cl.enqueue_copy(queue, self.token_buf, np.asarray(tokens, np.int32))
            if n == 1 and self.replay and not self.streamed:
                self._recorded_step(cache, pos0).replay(pos0)
                cache.length += 1
                return 1
            self.kern.get_rows(self.embd, self.token_buf, self.x, n)
        else:  # split past the largest buffer, or not on the device: rows dequantized here
            table = self.source.tensors["token_embd.weight"]
            read = self.ring.rows if self.ring else lambda ref, a, b: ref.rows(a, b)
            rows = np.concatenate([read(table, t, t + 1) for t in tokens])
            cl.enqueue_copy(queue, self.x, rows)
        n_out = self._layers_and_head(n, pos0, cache, all_logits)
        cache.length += n
        return n_out

    def _recorded_step(self, cache: DeviceKVCache, pos0: int) -> Recording:
        """This cache's decode step as a recording (made now if the last one no longer fits:
        another split count for attention, or scratch buffers replaced since)."""
        key = (self.kern.attention_splits(pos0 + 1), self.scratch_generation,
               self.kern.scratch_generation)
        if cache.recorded is None or cache.recorded[0] != key:
            def step() -> None:
                self.kern.get_rows(self.embd, self.token_buf, self.x, 1)
                self._layers_and_head(1, position(pos0), cache, False)

            cache.recorded = (key, self.kern.record(step))
        return cache.recorded[1]

    def _layers_and_head(self, n: int, pos0: int | PerStep, cache: DeviceKVCache,
                         all_logits: bool) -> int:
        """The launches from the embedded tokens in self.x to the logits; returns logit rows.
        `pos0` is a PerStep while a decode step is being recorded."""
        cfg, k, queue = self.config, self.kern, self.dev.queue
        C, H, KV, D = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        kv_off = pos0 * KV * D
        for i in range(cfg.n_layers):
            w = self._enter(i)
            q8 = k.rms_norm(self.x, w["attn_norm"], self.xn, C, n, cfg.norm_eps,
                            q8=int8_input(w, "attn_q", "attn_k", "attn_v"))
            if n == 1:
                k.matmul_qkv(w["attn_q"], w["attn_k"], w["attn_v"], self.xn, self.q, cache.k[i],
                             cache.v[i], kv_off, q8=q8)
            else:
                k.matmul(w["attn_q"], self.xn, self.q, n, q8=q8)
                k.matmul(w["attn_k"], self.xn, cache.k[i], n, y_off=kv_off, q8=q8)
                k.matmul(w["attn_v"], self.xn, cache.v[i], n, y_off=kv_off, q8=q8)
            if cfg.qkv_bias:
                k.add_bias(self.q, 0, w["attn_q.bias"], H * D, n)
                k.add_bias(cache.k[i], kv_off, w["attn_k.bias"], KV * D, n)
                k.add_bias(cache.v[i], kv_off, w["attn_v.bias"], KV * D, n)
            neox = cfg.rope_style == "neox"
            k.rope(self.q, 0, self.cos, self.sin, pos0, n, H, D, cfg.rope_dim, neox)
            k.rope(cache.k[i], kv_off, self.cos, self.sin, pos0, n, KV, D, cfg.rope_dim, neox)
            q8 = k.attention(self.q, cache.k[i], cache.v[i], self.att, self.part, n, H, KV, D,
                             pos0, q8=int8_input(w, "attn_output"))
            k.matmul(w["attn_output"], self.att, self.x, n, accumulate=True, q8=q8)
            q8 = k.rms_norm(self.x, w["ffn_norm"], self.xn, C, n, cfg.norm_eps,
                            q8=int8_input(w, "ffn_gate", "ffn_up"))
            if n == 1:
                k.matmul_glu(w["ffn_gate"], w["ffn_up"], self.xn, self.gate, self.up, q8=q8)
            else:
                k.matmul(w["ffn_gate"], self.xn, self.gate, n, q8=q8)
                k.matmul(w["ffn_up"], self.xn, self.up, n, q8=q8)
                k.swiglu(self.gate, self.up, n * cfg.ffn_dim)
            k.matmul(w["ffn_down"], self.gate, self.x, n, accumulate=True)
            if i in self.streamed:
                self.ring.leave(i)
        n_out = n if all_logits else 1
        if n_out < n:  # only the last row goes through the head
            self.dev.cl.enqueue_copy(queue, self.xn, self.x, byte_count=4 * C,
                                     src_offset=4 * (n - 1) * C)
        head = self.head
        if head is None:  # streamed
            head = next(iter(self.ring.enter(cfg.n_layers).values()))
        wants_q8 = head.qtype in Q8_ACTIVATION_TYPES
        if n_out < n:
            q8 = k.rms_norm(self.xn, self.output_norm, self.xn, C, 1, cfg.norm_eps, q8=wants_q8)
        else:
            q8 = k.rms_norm(self.x, self.output_norm, self.xn, C, n, cfg.norm_eps, q8=wants_q8)
        k.matmul(head, self.xn, self.logits, n_out, q8=q8)
        if head is not self.head:
            self.ring.leave(cfg.n_layers)
        return n_out

    def _enter(self, i: int) -> dict[str, Any]:
        """Layer i's weights: resident, or its ring slot's (waiting for its upload) with the
        layer's norms and biases."""
        if i not in self.streamed:
            return self.layers[i]
        b = f"blk.{i}."
        slot = self.ring.enter(i)
        return {**self.layers[i], **{m: slot[b + m + ".weight"] for m in MATRICES}}

    def greedy_next(self) -> int:
        """argmax of the first logits row on the device (after a forward_device without
        all_logits: the last token's): one int crosses the bus, not the vocabulary."""
        self.kern.argmax(self.logits, self.next_id, self.config.vocab_size, 1)
        return int(self.kern.read(self.next_id, (1,), np.int32)[0])

    def memory_in_use(self) -> tuple[int, int]:
        """(bytes of device buffers this backend holds: copied weights, KV caches, scratch;
        the device's global memory): the server's pressure monitor reads it."""
        scratch = [getattr(self, n, None) for n in ("x", "xn", "q", "att", "gate", "up",
                                                    "logits", "token_buf", "part")]
        held = self.kern.uploaded_bytes + sum(b.size for b in scratch if b is not None) + sum(
            c.nbytes for c in self.caches) + (self.ring.nbytes if self.ring else 0)
        return held, int(self.dev.device.global_mem_size)

    def describe(self) -> dict[str, Any]:
        return {"device": self.dev.describe(), "params": vars(self.params),
                "params_from": self.params_from, "programs": dict(self.programs.stats),
                "weight_bytes": self.weight_bytes,
                "host_pointer_bytes": self.kern.host_pointer_bytes,
                "ring": None if self.ring is None else {
                    "slots": len(self.ring.slots), "slot_bytes": self.ring.slot_bytes,
                    "staging_bytes": self.ring.staging.nbytes,
                    "streamed_units": len(self.streamed)},
                "load_seconds": round(self.load_seconds, 3)}


def open_device() -> tuple[Device, ProgramCache]:
    """The device with its programs built or loaded, before a memory plan reads the process's
    baseline: the OpenCL driver and its compiler (PoCL's LLVM: ~50 MiB here) are host memory the
    budget must count."""
    dev = find_device()
    programs = ProgramCache(dev)
    Kernels(dev, load_params(dev)[0], programs)
    return dev, programs


def quick_probe(backend: OpenCLBackend, source: ModelSource) -> tuple[float, float]:
    """Seconds per decode step: (OpenCL, best of 3 real steps; numpy, estimated from its own
    layer 0 run for real, best of 3, times the layers, plus the output head scaled from it by
    weight count). `auto` keeps OpenCL only when it is the faster."""
    from runtime.backends.numpy_backend import NumpyBackend, rms_norm

    def best(step: Any) -> float:
        step()  # first run: kernel set-up on the device, weight dequantization in numpy
        times = []
        for _ in range(3):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return min(times)

    cache = backend.new_cache(8)

    def ocl_step() -> None:
        cache.length = 0
        backend.forward([0], cache)

    ocl = best(ocl_step)
    cfg, ref = backend.config, NumpyBackend(source)
    ref_cache, x, eps = ref.new_cache(8), ref.embed([0]), cfg.norm_eps

    def numpy_layer() -> None:
        h = x + ref.attention(rms_norm(x, ref.w("blk.0.attn_norm.weight"), eps), 0, ref_cache)
        h + ref.mlp(rms_norm(h, ref.w("blk.0.ffn_norm.weight"), eps), 0)

    layer = best(numpy_layer)
    layer_weights = sum(math.prod(source.tensors[f"blk.0.{m}.weight"].shape) for m in MATRICES)
    head = layer * cfg.vocab_size * cfg.dim / layer_weights
    return ocl, layer * cfg.n_layers + head
