"""The dashboard's own SQLite file: runtime samples taken from each device's /metrics.

The rollout history stays in fleet.db (provision.fleet.history); this file only keeps what the
dashboard measured itself, so deleting it loses charts, never history. Old samples are pruned
as new ones arrive: the charts show the last hour, the file keeps a day.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from provision.fleet.history import open_store
from provision.paths import state_dir

KEEP_S = 24 * 3600
FIELDS = ("online", "health", "tokens", "requests_local", "requests_offloaded", "queue_depth",
          "pressure", "mem_total", "mem_available", "zram_used", "error")
SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    device TEXT NOT NULL,
    t REAL NOT NULL,
    online INTEGER NOT NULL,        -- /health answered at all
    health TEXT NOT NULL,           -- ok | loading | error | unreachable
    tokens REAL,                    -- claw_tokens_total, all kinds and routes (a counter)
    requests_local REAL,            -- claw_requests_total served here (a counter)
    requests_offloaded REAL,        -- claw_requests_total sent to the remote (a counter)
    queue_depth REAL,               -- claw_queue_depth, all priorities
    pressure REAL,                  -- claw_memory_pressure (0 or 1)
    mem_total REAL,
    mem_available REAL,
    zram_used REAL,
    error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS samples_by_device ON samples (device, t);
"""


def db_path() -> Path:
    return state_dir() / "dashboard.db"


@contextmanager
def connect(path: Path | None = None) -> Iterator[sqlite3.Connection]:
    with open_store(path or db_path(), SCHEMA) as con:
        yield con


def add(rows: list[dict[str, Any]], path: Path | None = None) -> None:
    """Record one sample per device (a dict with `device`, `t` and FIELDS) and prune old ones."""
    cols = ("device", "t", *FIELDS)
    with connect(path) as con:
        con.executemany(f"INSERT INTO samples ({', '.join(cols)}) VALUES "
                        f"({', '.join('?' * len(cols))})",
                        [tuple(r.get(c) for c in cols) for r in rows])
        con.execute("DELETE FROM samples WHERE t < ?", (time.time() - KEEP_S,))


def latest(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """Each device's newest sample."""
    with connect(path) as con:
        rows = con.execute("SELECT s.* FROM samples s JOIN (SELECT device, MAX(t) AS t FROM "
                           "samples GROUP BY device) m ON s.device = m.device AND s.t = m.t")
        return {r["device"]: dict(r) for r in rows}


def since(device: str, seconds: float, path: Path | None = None) -> list[dict[str, Any]]:
    """A device's samples over the last `seconds`, oldest first."""
    with connect(path) as con:
        rows = con.execute("SELECT * FROM samples WHERE device=? AND t >= ? ORDER BY t",
                           (device, time.time() - seconds))
        return [dict(r) for r in rows]
