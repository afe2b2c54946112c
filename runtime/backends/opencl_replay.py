"""Decode steps replayed from a recording, so that Python's per-launch cost leaves the loop.

A decode step is ~300 launches of the same kernels on the same buffers; only the position
changes. Through pyopencl's `kernel(queue, ...)` each launch converts and sets every argument
again (~50 µs of host CPU a launch here, measured), and on a 2-core CPU device that host thread
competes with the two threads running the kernels. A recording keeps one kernel object per
launch with its arguments set once; a replay re-sets only the arguments that depend on the
position (`PerStep`) and enqueues (~3 µs a launch). The launches, their order and their
arguments are the same as the direct path's, so the results are identical (a test checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class PerStep:
    """A scalar kernel argument that a replay recomputes from the step's position:
    scale·pos + offset. `now` is its value at the recorded position, for the launchers that
    size a launch from it (a recording is only replayed while those sizes hold). It has no
    __int__ on purpose: np.int32(PerStep) fails loudly instead of freezing the value."""

    scale: int
    offset: int
    pos: int

    @property
    def now(self) -> int:
        return self.scale * self.pos + self.offset

    def at(self, pos: int) -> np.int32:
        return np.int32(self.scale * pos + self.offset)

    def __add__(self, other: int) -> PerStep:
        return PerStep(self.scale, self.offset + other, self.pos)

    __radd__ = __add__

    def __mul__(self, factor: int) -> PerStep:
        return PerStep(self.scale * factor, self.offset * factor, self.pos)


def position(pos: int) -> PerStep:
    """The decode position as a per-step argument (recorded at `pos`)."""
    return PerStep(1, 0, pos)


def i32(value: int | PerStep) -> np.int32 | PerStep:
    """A launcher's int argument: np.int32, or passed through when it changes per step."""
    return value if isinstance(value, PerStep) else np.int32(value)


def now(value: int | PerStep) -> int:
    """The value at this step, for sizes computed from an argument."""
    return value.now if isinstance(value, PerStep) else value


class Recording:
    """Launches captured instead of enqueued (Kernels.launch while recording), then replayed."""

    def __init__(self, cl: Any, queue: Any):
        self.cl, self.queue = cl, queue
        self.launches: list[tuple[Any, tuple, tuple | None, list[tuple[int, PerStep]]]] = []
        self.keep: list[tuple] = []  # the arguments' buffers, alive as long as the kernels

    def add(self, kernel: Any, gsize: tuple, lsize: tuple | None, args: tuple) -> None:
        per_step = []
        for i, arg in enumerate(args):
            if isinstance(arg, PerStep):
                per_step.append((i, arg))
                arg = arg.at(arg.pos)
            kernel.set_arg(i, arg)
        self.launches.append((kernel, gsize, lsize, per_step))
        self.keep.append(args)

    def replay(self, pos: int, events: list | None = None) -> None:
        """Enqueue the launches for position `pos`; `events` collects (kernel name, event)
        for a profiler (bench/profile_opencl.py)."""
        enqueue, queue = self.cl.enqueue_nd_range_kernel, self.queue
        for kernel, gsize, lsize, per_step in self.launches:
            for i, arg in per_step:
                kernel.set_arg(i, arg.at(pos))
            event = enqueue(queue, kernel, gsize, lsize)
            if events is not None:
                events.append((kernel.function_name, event))
