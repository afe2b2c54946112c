"""Prometheus metrics for one server: requests, tokens, latencies, queue depth, local vs
offloaded, and the memory signals the offload policy acts on. Each server gets its own
registry, so two servers in one process (tests, benchmarks) never share counters."""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # the *_created series double the output and no dashboard reads them

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("claw_requests", "HTTP inference requests by outcome",
                                ["endpoint", "priority", "route", "outcome"], registry=r)
        self.tokens = Counter("claw_tokens", "Tokens processed", ["kind", "route"], registry=r)
        self.latency = Histogram("claw_request_seconds", "Request latency, end to end",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("claw_first_token_seconds", "Time to the first text",
                                     ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("claw_queue_wait_seconds", "Wait in the local queue",
                                    ["priority"], buckets=LATENCY_BUCKETS, registry=r)
        self.decisions = Counter("claw_offload_decisions", "Where each request was sent and why",
                                 ["decision", "reason"], registry=r)
        self.queue_depth = Gauge("claw_queue_depth", "Requests waiting locally", ["priority"],
                                 registry=r)
        self.active = Gauge("claw_active_sequences", "Sequences decoding now", registry=r)
        self.offload_inflight = Gauge("claw_offload_inflight", "Requests at the remote now",
                                      registry=r)
        self.preempted = Counter("claw_preempted_sequences",
                                 "Running sequences paused for better-priority work",
                                 ["priority"], registry=r)
        self.decode_steps = Counter("claw_decode_steps", "Batched decode steps", registry=r)
        self.decode_rows = Counter("claw_decode_rows", "Sequences advanced by those steps",
                                   registry=r)
        self.model_loaded = Gauge("claw_model_loaded", "1 once the local model is loaded",
                                  registry=r)
        self.pressure = Gauge("claw_memory_pressure", "1 while under memory pressure",
                              registry=r)
        self.pressure_changes = Counter("claw_memory_pressure_transitions",
                                        "Pressure started or cleared", registry=r)
        self.memory = Gauge("claw_memory_bytes", "Memory signals the offload policy reads",
                            ["signal"], registry=r)
        self.memory_fraction = Gauge("claw_memory_fraction", "The same signals as fractions",
                                     ["signal"], registry=r)
        self.psi = Gauge("claw_memory_psi_some_avg10", "/proc/pressure/memory some avg10",
                         registry=r)

    def render(self, scheduler: Any, reading: Any) -> bytes:
        """The exposition text, after copying the live values (queue, memory) in."""
        from runtime.server.scheduler import PRIORITIES

        for p in PRIORITIES:
            self.queue_depth.labels(p).set(scheduler.depth(p) if scheduler else 0)
        self.active.set(scheduler.active if scheduler else 0)
        if reading is not None:
            for name in ("mem_total", "mem_available", "cgroup_limit", "cgroup_usage",
                         "swap_used", "zram_used", "gpu_memory_used"):
                value = getattr(reading, name)
                if value is not None:
                    self.memory.labels(name).set(value)
            for name in ("mem_available_fraction", "cgroup_usage_fraction",
                         "swap_used_fraction", "gpu_memory_fraction"):
                value = getattr(reading, name)
                if value is not None:
                    self.memory_fraction.labels(name).set(value)
            if reading.psi_some_avg10 is not None:
                self.psi.set(reading.psi_some_avg10)
        return generate_latest(self.registry)
