"""The `gpu` tier: runs only where a GPU OpenCL device exists (the lent NVIDIA machine)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

cl = pytest.importorskip("pyopencl", reason="pyopencl is not installed")


def _gpu_devices():
    try:
        platforms = cl.get_platforms()
    except cl.Error:
        return []
    return [d for p in platforms for d in p.get_devices() if d.type & cl.device_type.GPU]


GPUS = _gpu_devices()
requires_gpu = pytest.mark.skipif(not GPUS, reason="no GPU OpenCL device on this machine "
                                  "(PoCL's CPU device only); the gpu tier runs on the GPU machine")


@requires_gpu
def test_a_kernel_runs_on_the_gpu_and_agrees_with_numpy():
    ctx = cl.Context([GPUS[0]])
    queue = cl.CommandQueue(ctx)
    program = cl.Program(ctx, """
        __kernel void axpy(float a, __global const float *x, __global float *y) {
            size_t i = get_global_id(0);
            y[i] = a * x[i] + y[i];
        }""").build()
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1 << 20, dtype=np.float32)
    y = rng.standard_normal(1 << 20, dtype=np.float32)
    mf = cl.mem_flags
    x_buf = cl.Buffer(ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=x)
    y_buf = cl.Buffer(ctx, mf.READ_WRITE | mf.COPY_HOST_PTR, hostbuf=y)
    program.axpy(queue, x.shape, None, np.float32(2.5), x_buf, y_buf)
    out = np.empty_like(y)
    cl.enqueue_copy(queue, out, y_buf)
    np.testing.assert_allclose(out, 2.5 * x + y, rtol=1e-6, atol=1e-6)
