"""Runtime samples as chart series, and series as SVG polylines the templates draw.

Counters (tokens, requests) become rates or per-interval counts between consecutive samples; a
counter that went down means the runtime restarted, and that interval is left out rather than
drawn as a negative spike.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any

W, H, PAD = 560, 160, 36  # SVG size and the left/bottom margin for labels


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]  # (unix time, value)


@dataclass
class Chart:
    title: str
    unit: str
    series: list[Series]
    t0: float
    t1: float

    @property
    def empty(self) -> bool:
        return not any(s.points for s in self.series)

    @property
    def ymax(self) -> float:
        top = max((v for s in self.series for _, v in s.points), default=0.0)
        return top * 1.1 if top > 0 else 1.0

    def polyline(self, series: Series) -> str:
        """`points` for an SVG polyline in a W×H box, time left to right."""
        span, ymax = max(self.t1 - self.t0, 1e-9), self.ymax
        return " ".join(f"{PAD + (t - self.t0) / span * (W - PAD - 4):.1f},"
                        f"{H - PAD + 8 - v / ymax * (H - PAD):.1f}" for t, v in series.points)

    def last(self, series: Series) -> str:
        return f"{series.points[-1][1]:.3g}" if series.points else "–"


def _deltas(samples: list[dict[str, Any]], key: str, per_second: bool) -> list[tuple[float, float]]:
    out = []
    for a, b in pairwise(samples):
        if a[key] is None or b[key] is None or b[key] < a[key] or b["t"] <= a["t"]:
            continue
        d = b[key] - a[key]
        out.append((b["t"], d / (b["t"] - a["t"]) if per_second else d))
    return out


def _values(samples: list[dict[str, Any]], key: str, scale: float = 1.0
            ) -> list[tuple[float, float]]:
    return [(s["t"], s[key] * scale) for s in samples if s[key] is not None]


def runtime_charts(samples: list[dict[str, Any]], t0: float, t1: float) -> list[Chart]:
    """tokens/s, queue depth, local vs offloaded requests, memory pressure and memory use."""
    online = [s for s in samples if s["online"]]
    mem_used = [(s["t"], 1 - s["mem_available"] / s["mem_total"]) for s in online
                if s["mem_total"] and s["mem_available"] is not None]
    return [
        Chart("Tokens per second", "tok/s", [Series("tokens/s", _deltas(online, "tokens", True))],
              t0, t1),
        Chart("Queue depth", "requests", [Series("waiting", _values(online, "queue_depth"))],
              t0, t1),
        Chart("Requests per sample: local vs offloaded", "requests",
              [Series("local", _deltas(online, "requests_local", False)),
               Series("offloaded", _deltas(online, "requests_offloaded", False))], t0, t1),
        Chart("Memory pressure and memory in use", "fraction",
              [Series("pressure", _values(online, "pressure")),
               Series("memory used", mem_used)], t0, t1),
    ]
