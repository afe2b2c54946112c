"""The local queue: requests wait by priority, then decode together.

One worker thread owns the model. Each turn it admits waiting jobs (critical first, then
normal, then background; first come first served within a priority) into free batch slots,
prefilling each (a full batch makes room for better work by pausing its lowest-priority
sequence, cache kept, until a slot frees), then runs one decode step for every running
sequence with a single `forward_batch` call, so B sequences cost one pass over the weights
instead of B. Text pieces go back to each request's asyncio queue; a job cancelled by its
client (disconnect) is dropped at the next step and its KV cache freed.

The queue is bounded and refuses rather than drops: background work past
`background_queue` waiting jobs, normal work past `max_queue`, critical work only past
`max_queue + critical_reserve`; each refusal is a `Refused` that the HTTP layer turns into a
429 (or 503) with Retry-After.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from runtime.generate import Generation, GenerationResult
from runtime.sampling import SamplingParams

log = logging.getLogger("claw.serve.scheduler")

PRIORITIES = ("critical", "normal", "background")
RANK = {p: i for i, p in enumerate(PRIORITIES)}


class Refused(Exception):
    """The queue has no room for this priority now; retry after `retry_after` seconds."""

    def __init__(self, message: str, status: int, retry_after: int):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


@dataclass
class Done:
    result: GenerationResult


@dataclass
class Failed:
    error: BaseException


@dataclass(eq=False)
class Job:
    """One request's local generation. `out` receives str pieces, then one Done or Failed."""

    priority: str
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    order: int = 0  # arrival number, set by the scheduler: first come, first served

    def send(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancelled = True


@dataclass(eq=False)
class _Running:
    job: Job
    gen: Generation
    logits: Any


class Scheduler:
    def __init__(self, model: Any, *, max_batch: int, max_queue: int, background_queue: int,
                 critical_reserve: int, retry_after_s: int,
                 on_step: Callable[[int], None] | None = None,
                 on_preempt: Callable[[str], None] | None = None):
        self.model = model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.background_queue, self.critical_reserve = background_queue, critical_reserve
        self.retry_after_s = retry_after_s
        self.on_step, self.on_preempt = on_step, on_preempt
        self._heap: list[tuple[int, int, Job | _Running]] = []  # jobs and paused sequences
        self._order = itertools.count()
        self._running: list[_Running] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="claw-scheduler", daemon=True)

    # ---- the request side (event loop thread) ------------------------------------------------

    def depth(self, priority: str | None = None) -> int:
        """Waiting work (paused sequences included), of one priority or all."""
        with self._cond:
            return sum(1 for _, _, item in self._heap if priority in (
                None, (item.job if isinstance(item, _Running) else item).priority))

    @property
    def active(self) -> int:
        return len(self._running)

    def submit(self, job: Job, *, force: bool = False) -> None:
        """Queue `job`, or raise Refused. `force` is for work already accepted once (a
        remote's failure coming back), which must not be lost to a full queue."""
        with self._cond:
            depth = len(self._heap) if not force else -1
            limit = {"critical": self.max_queue + self.critical_reserve,
                     "normal": self.max_queue,
                     "background": self.background_queue}[job.priority]
            if depth >= limit:
                status = 503 if job.priority == "critical" else 429
                raise Refused(f"the local queue is full for {job.priority} work ({depth} "
                              f"waiting, limit {limit}); retry after {self.retry_after_s} s",
                              status, self.retry_after_s)
            job.order = next(self._order)
            heapq.heappush(self._heap, (RANK[job.priority], job.order, job))
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        with self._cond:
            self._cond.notify()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # ---- the worker thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._heap and not self._running:
                    self._cond.wait()
                if self._stop:
                    break
                admitted = self._take()
            for item in admitted:
                if isinstance(item, _Running):
                    self._running.append(item)  # a paused sequence resumes where it was
                else:
                    self._admit(item)
            self._step()
        for run in self._running:
            run.job.send(Failed(RuntimeError("the server is shutting down")))
        for _, _, item in self._heap:
            (item.job if isinstance(item, _Running) else item).send(
                Failed(RuntimeError("the server is shutting down")))
        self._running.clear()

    def _take(self) -> list[Job | _Running]:
        """Waiting work for the free batch slots, best priority first. When the batch is
        full and better work waits, the running sequence of the lowest priority (the newest
        among equals) is paused: it goes back to the queue with its cache and resumes later,
        so critical work never waits for background work to finish."""
        taken: list[Job | _Running] = []
        while self._heap:
            rank, _, item = self._heap[0]
            if len(self._running) + len(taken) >= self.max_batch:
                victim = max(self._running, default=None,
                             key=lambda r: (RANK[r.job.priority], r.job.order))
                if victim is None or RANK[victim.job.priority] <= rank:
                    break
                self._running.remove(victim)
                heapq.heappush(self._heap, (RANK[victim.job.priority], victim.job.order, victim))
                if self.on_preempt:
                    self.on_preempt(victim.job.priority)
                continue
            heapq.heappop(self._heap)
            if not (item.job if isinstance(item, _Running) else item).cancelled:
                taken.append(item)
        return taken

    def _admit(self, job: Job) -> None:
        job.started_at = time.monotonic()
        try:
            gen = self.model.generate(job.prompt_ids, job.params)
            logits = gen.start()
        except Exception as exc:
            log.exception("prefill failed")
            job.send(Failed(exc))
            return
        self._running.append(_Running(job, gen, logits))

    def _step(self) -> None:
        still = []
        for run in self._running:
            if run.job.cancelled:
                continue  # its cache goes with it
            try:
                piece = run.gen.step(run.logits)
            except Exception as exc:
                log.exception("sampling failed")
                run.job.send(Failed(exc))
                continue
            if piece:
                run.job.send(piece)
            if run.gen.done:
                run.job.send(Done(run.gen.result))
            else:
                still.append(run)
        self._running = still
        if not still:
            return
        backend = self.model.backend
        try:
            logits = backend.forward_batch([r.gen.next_token for r in still],
                                           [r.gen.cache for r in still])
        except Exception as exc:
            log.exception("batched decode failed")
            for run in still:
                run.job.send(Failed(exc))
            self._running = []
            return
        for run, row in zip(still, logits, strict=True):
            run.logits = row
        if self.on_step:
            self.on_step(len(still))
