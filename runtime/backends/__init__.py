"""Compute backends behind one interface: `numpy` (the readable reference) and `opencl`.

A backend holds a model's weights and runs its forward pass over a KV cache; the generator,
the server and the benchmarks only ever call `new_cache` and `forward`, so a faster backend
plugs in without touching them, and tests compare any two backends on the same inputs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from runtime.config import ModelConfig
from runtime.errors import DeviceError, ModelError
from runtime.memory_plan import Plan, mib
from runtime.model_file import ModelSource

BACKENDS = ("numpy", "opencl", "auto")


class KVCache:
    """Keys and values of every layer for one sequence: (layers, n_ctx, kv_heads, head_dim)."""

    def __init__(self, cfg: ModelConfig, n_ctx: int):
        shape = (cfg.n_layers, n_ctx, cfg.n_kv_heads, cfg.head_dim)
        self.k = np.zeros(shape, np.float32)  # zero pages are only committed when written
        self.v = np.zeros(shape, np.float32)
        self.n_ctx = n_ctx
        self.length = 0  # positions filled so far

    def truncate(self, length: int) -> None:
        """Forget positions ≥ length (to reuse a shared prompt prefix)."""
        self.length = min(self.length, length)


class Backend(ABC):
    name: ClassVar[str]

    def __init__(self, source: ModelSource):
        self.source = source
        self.config = source.config

    def new_cache(self, n_ctx: int) -> KVCache:
        return KVCache(self.config, n_ctx)

    @abstractmethod
    def forward(self, tokens: Sequence[int], cache: KVCache, *,
                all_logits: bool = False) -> np.ndarray:
        """Run `tokens` at positions cache.length…; return logits (len(tokens) or 1, vocab)."""

    def forward_batch(self, tokens: Sequence[int], caches: Sequence[KVCache]) -> np.ndarray:
        """One decode step for B sequences: token b runs at caches[b].length; returns logits
        (B, vocab). This default runs them one by one; a backend that can read each weight
        once for all B rows (the numpy one) overrides it, which is what makes a server
        decoding several requests at once faster than serving them in turn."""
        return np.concatenate([self.forward([t], c) for t, c in zip(tokens, caches, strict=True)])

    def memory_in_use(self) -> tuple[int, int] | None:
        """(bytes in use, bytes in total) of the device memory this backend allocates, read by
        the server's pressure monitor; None for backends that hold nothing off the host."""
        return None

    def check_room(self, tokens: Sequence[int], cache: KVCache) -> None:
        if not tokens:
            raise ValueError("forward needs at least one token")
        if cache.length + len(tokens) > cache.n_ctx:
            raise ModelError(f"context full: {cache.length} + {len(tokens)} tokens exceed "
                             f"n_ctx {cache.n_ctx} (expected a shorter prompt or a larger "
                             "--ctx)")
        bad = [t for t in tokens if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ModelError(f"token id {bad[0]} is out of range "
                             f"(expected 0 ≤ id < {self.config.vocab_size})")


@dataclass
class Choice:
    backend: Backend
    reason: str


def create_backend(name: str, source: ModelSource, *, memory_budget: int | None = None,
                   plan: Plan | None = None, device: Any = None) -> Choice:
    """Make the backend `name` (numpy, opencl or auto), saying why `auto` picked what it did.

    `opencl` under a budget needs a plan made for it (make_plan(..., backend="opencl")): its
    streamed units go through a ring of device buffers. `auto` under a plan that streams picks
    numpy: probing OpenCL would upload every weight, past the budget. `device`: (Device,
    ProgramCache) from opencl_backend.open_device, opened before the plan measured the
    process."""
    if name not in BACKENDS:
        raise ModelError(f"backend {name!r} is not known (expected one of: {', '.join(BACKENDS)})")
    from runtime.backends.numpy_backend import NumpyBackend

    def numpy_backend() -> Backend:
        return NumpyBackend(source, memory_budget=memory_budget, plan=plan)

    streams = plan is not None and plan.streaming
    if name == "numpy":
        return Choice(numpy_backend(), "asked for numpy")
    if name == "opencl":
        budgeted = plan is not None and plan.budget is not None
        if budgeted and plan.backend != "opencl":
            raise ModelError(f"--memory-budget {mib(plan.budget)} was planned for numpy; "
                             "expected a plan made with backend='opencl' for --backend opencl")
        backend = _opencl(source, plan if budgeted else None, device)
        ring = f", {mib(backend.ring.nbytes)} ring of {len(backend.ring.slots)} slots for " \
            f"{len(backend.streamed)} streamed units" if backend.ring else ""
        return Choice(backend, f"asked for opencl: {backend.dev.describe()}{ring}")
    if streams:
        return Choice(numpy_backend(), "auto: numpy (the memory budget streams layers, and "
                      "probing OpenCL would upload every weight; --backend opencl streams "
                      "through a ring of device buffers)")
    return _auto(source, numpy_backend)


def _opencl(source: ModelSource, plan: Plan | None = None, device: Any = None):
    """An OpenCLBackend (imported lazily: pyopencl is optional), on `device` when given."""
    from runtime.backends.opencl_backend import OpenCLBackend
    from runtime.backends.opencl_device import NoDevice

    dev, programs = device if device is not None else (None, None)
    try:
        return OpenCLBackend(source, device=dev, programs=programs, plan=plan)
    except NoDevice as e:
        raise DeviceError(f"--backend opencl: {e} (expected an OpenCL device, or --backend "
                          "numpy / auto)") from None


def _auto(source: ModelSource, numpy_backend: Callable[[], Backend]) -> Choice:
    """OpenCL when a device exists, can run this model and is faster on a quick probe (one
    decode step against numpy's estimate from layer 0); numpy otherwise, saying why."""

    def numpy(reason: str) -> Choice:
        return Choice(numpy_backend(), f"auto: numpy ({reason})")

    try:
        from runtime.backends.opencl_backend import OpenCLBackend, quick_probe
        from runtime.backends.opencl_device import NoDevice
    except ImportError as e:
        return numpy(f"OpenCL backend unavailable: {e}")
    try:
        backend = OpenCLBackend(source)
    except NoDevice as e:
        return numpy(str(e))
    except ModelError as e:
        return numpy(f"OpenCL cannot run this model: {e}")
    ocl, est = quick_probe(backend, source)
    speed = f"decode step {ocl * 1e3:.1f} ms on OpenCL vs ~{est * 1e3:.1f} ms on numpy"
    if ocl < est:
        return Choice(backend, f"auto: opencl on {backend.dev.describe()}, {speed}")
    return numpy(f"OpenCL on {backend.dev.name} is slower: {speed}")
