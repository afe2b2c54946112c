"""Finding an OpenCL device and describing it: what the program cache keys on, what the
allocator must respect (max allocation, unified memory) and its measured copy bandwidth.

pyopencl is imported here and nowhere at module level elsewhere, so the runtime still imports
on a device without it; `find_device` turns "no ICD / no platform / no device" into one
`NoDevice` error with the reason, which `auto` reports and `--backend opencl` raises.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np


class NoDevice(RuntimeError):
    """No usable OpenCL device: pyopencl missing, no platform (ICD) or no device."""


@dataclass
class Device:
    cl: Any  # the pyopencl module
    device: Any
    context: Any
    queue: Any

    @property
    def name(self) -> str:
        return self.device.name.strip()

    @property
    def platform(self) -> str:
        return self.device.platform.name.strip()

    @property
    def is_cpu(self) -> bool:
        return bool(self.device.type & self.cl.device_type.CPU)

    @property
    def unified_memory(self) -> bool:
        """Host and device share memory (CPU devices, ARM iGPUs): host pointers avoid a copy."""
        try:
            return bool(self.device.host_unified_memory) or self.is_cpu
        except self.cl.LogicError:  # OpenCL 2.0+ drivers may drop the query
            return self.is_cpu

    @property
    def max_alloc(self) -> int:
        """Largest single buffer; CLAW_OPENCL_MAX_ALLOC lowers it (tests split buffers with it)."""
        limit = int(self.device.max_mem_alloc_size)
        forced = os.environ.get("CLAW_OPENCL_MAX_ALLOC")
        return min(limit, int(forced)) if forced else limit

    def identity(self) -> dict[str, str]:
        """What a compiled binary depends on: device, driver and platform versions."""
        d = self.device
        return {"platform": self.platform, "platform_version": d.platform.version.strip(),
                "device": self.name, "device_version": d.version.strip(),
                "driver": d.driver_version.strip()}

    def describe(self) -> str:
        return (f"{self.name} ({self.platform}, {self.device.max_compute_units} compute units, "
                f"{self.device.global_mem_size / 2**30:.1f} GiB)")


def _import_cl() -> Any:
    try:
        import pyopencl as cl
    except ImportError as e:
        raise NoDevice(f"pyopencl is not installed ({e}); install clawforge[runtime]") from None
    return cl


def find_device(prefer_gpu: bool = True, kind: str = "any") -> Device:
    """The first GPU (or accelerator) when `prefer_gpu`, else the first device; `kind` "cpu" or
    "gpu" keeps only CPU or only non-CPU devices (the test tiers pick theirs so).

    CLAW_OPENCL_DEVICE=substring picks a device by name or platform name.
    """
    cl = _import_cl()
    try:
        platforms = cl.get_platforms()
    except cl.Error as e:  # pyopencl raises LogicError/RuntimeError when no ICD answers
        raise NoDevice(f"no OpenCL platform found ({e}); "
                       "install an OpenCL driver (ICD) such as PoCL") from None
    devices = []
    for platform in platforms:
        try:
            devices += platform.get_devices()
        except cl.Error:
            continue
    if not devices:
        raise NoDevice("no OpenCL device found on "
                       + (", ".join(p.name for p in platforms) or "any platform"))
    wanted = os.environ.get("CLAW_OPENCL_DEVICE")
    if wanted:
        devices = [d for d in devices
                   if wanted.lower() in f"{d.name} {d.platform.name}".lower()]
        if not devices:
            raise NoDevice(f"CLAW_OPENCL_DEVICE={wanted!r} matches no OpenCL device")
    if kind != "any":
        devices = [d for d in devices if bool(d.type & cl.device_type.CPU) == (kind == "cpu")]
        if not devices:
            raise NoDevice(f"no {kind.upper()} OpenCL device found")
    if prefer_gpu:
        devices.sort(key=lambda d: not d.type & (cl.device_type.GPU | cl.device_type.ACCELERATOR))
    device = devices[0]
    context = cl.Context([device])
    return Device(cl, device, context, cl.CommandQueue(context))


def gpu_devices() -> list[str]:
    """Names of non-CPU OpenCL devices here (the `gpu` test tier runs only when there is one)."""
    try:
        cl = _import_cl()
        return [d.name for p in cl.get_platforms() for d in p.get_devices()
                if not d.type & cl.device_type.CPU]
    except Exception:  # any failure to enumerate means "no GPU here"
        return []


def profiling_queue(dev: Device) -> Any:
    """A second queue on the device whose events carry device timestamps: benchmarks time
    kernels by them, not by the host clock, which adds launch and wake-up latency (tens of
    microseconds on a discrete GPU, as long as a whole small GEMV)."""
    return dev.cl.CommandQueue(dev.context, properties=dev.cl.command_queue_properties
                               .PROFILING_ENABLE)


def event_seconds(event: Any) -> float:
    event.wait()
    return (event.profile.end - event.profile.start) * 1e-9


def copy_bandwidth(dev: Device, program: Any, nbytes: int = 64 << 20, repeats: int = 5) -> float:
    """The device's own memory bandwidth in bytes/s (read + write), from the best of `repeats`
    runs of a float4 copy kernel timed on the device: the ceiling that decode's weight
    streaming is measured against. Buffers larger than the device's cache, so that the copy
    reaches memory."""
    cl = dev.cl
    cache = int(getattr(dev.device, "global_mem_cache_size", 0) or 0)
    nbytes = min(max(nbytes, 4 * cache), dev.max_alloc // 2) // 16 * 16
    queue = profiling_queue(dev)
    src = cl.Buffer(dev.context, cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR,
                    hostbuf=np.ones(nbytes // 4, np.float32))
    dst = cl.Buffer(dev.context, cl.mem_flags.WRITE_ONLY, nbytes)
    kernel = program.copy_probe
    kernel(queue, (nbytes // 16,), None, src, dst).wait()  # warm-up
    best = min(event_seconds(kernel(queue, (nbytes // 16,), None, src, dst))
               for _ in range(repeats))
    src.release()
    dst.release()
    return 2 * nbytes / best
