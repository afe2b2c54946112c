"""Samples each device's runtime: /health says whether it is up, /metrics what it is doing.

The dashboard asks the runtime servers directly over HTTP (as Prometheus would), not through
Ansible: a sample of twenty devices takes a second, so the charts can be fed every few seconds.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from provision.dashboard import store


@dataclass(frozen=True)
class Target:
    device: str
    url: str  # http://address:port of its runtime server


def parse_metrics(text: str) -> dict[str, float | None]:
    """The few figures the charts plot, from Prometheus exposition text."""
    out: dict[str, float | None] = {"tokens": 0.0, "requests_local": 0.0,
                                    "requests_offloaded": 0.0, "queue_depth": 0.0,
                                    "pressure": None, "mem_total": None, "mem_available": None,
                                    "zram_used": None}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name, labels, value = s.name, s.labels, s.value
            if name == "claw_tokens_total":
                out["tokens"] = (out["tokens"] or 0) + value
            elif name == "claw_requests_total" and labels.get("route") == "offload":
                out["requests_offloaded"] = (out["requests_offloaded"] or 0) + value
            elif name == "claw_requests_total" and labels.get("route") in ("local", "fallback"):
                out["requests_local"] = (out["requests_local"] or 0) + value
            elif name == "claw_queue_depth":
                out["queue_depth"] = (out["queue_depth"] or 0) + value
            elif name == "claw_memory_pressure":
                out["pressure"] = value
            elif name == "claw_memory_bytes" and labels.get("signal") in (
                    "mem_total", "mem_available", "zram_used"):
                out[labels["signal"]] = value
    return out


def sample(target: Target, client: httpx.Client) -> dict[str, Any]:
    """One device's sample; an unreachable device is a sample too (online 0, and why)."""
    row: dict[str, Any] = {"device": target.device, "t": time.time(), "online": 0,
                           "health": "unreachable", "error": ""}
    try:
        health = client.get(target.url + "/health")
        row["online"] = 1
        body = health.json() if health.headers.get("content-type", "").startswith(
            "application/json") else {}
        row["health"] = str(body.get("status") or f"http {health.status_code}")
        if body.get("error"):
            row["error"] = str(body["error"])[:300]
        metrics = client.get(target.url + "/metrics")
        metrics.raise_for_status()
        row.update(parse_metrics(metrics.text))
    except (httpx.HTTPError, ValueError) as exc:
        row["error"] = row["error"] or f"{type(exc).__name__}: {exc}"[:300]
    return row


class Sampler:
    """A daemon thread sampling every target each `interval` seconds into the store."""

    def __init__(self, targets: Callable[[], list[Target]], interval: float,
                 db: Path | None = None) -> None:
        self.targets, self.interval, self.db = targets, interval, db
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="claw-dashboard-sampler",
                                       daemon=True)

    def sample_once(self) -> list[dict[str, Any]]:
        targets = self.targets()
        if not targets:
            return []
        with httpx.Client(timeout=min(5.0, max(self.interval, 1.0))) as client, \
                ThreadPoolExecutor(max_workers=min(16, len(targets))) as pool:
            rows = list(pool.map(lambda t: sample(t, client), targets))
        store.add(rows, self.db)
        return rows

    def _loop(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            # a bad round must not end sampling for the dashboard's life
            with contextlib.suppress(Exception):
                self.sample_once()
            self.stop.wait(max(0.0, self.interval - (time.monotonic() - started)))
