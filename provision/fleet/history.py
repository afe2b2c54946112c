"""Rollout history: one SQLite file in the user's state directory.

Federated fine-tuning runs (`claw fed run`) are recorded in the same store (`fed_runs`): what
learned on the fleet is what a later rollout delivers, and both are read from one place.

A rollout row says who started what, when, with which settings, and how it ended; a device
row per device says where that device got to (its last phase), from which version to which,
how long it took and what failed. Rows are written as the runner's events arrive, so a
controller killed mid-rollout leaves a history that says where it stopped: a `running` rollout
whose process is gone is reported (and recorded) as `interrupted`.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from provision.errors import BadInput
from provision.paths import state_dir

SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,            -- rollout | rollback
    inventory TEXT NOT NULL,
    image TEXT NOT NULL,
    image_id TEXT NOT NULL,
    settings TEXT NOT NULL,        -- JSON: canary, batch, max_fail, strategy, delivery, ...
    user TEXT NOT NULL,
    controller TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started REAL NOT NULL,
    ended REAL,
    status TEXT NOT NULL,          -- running | succeeded | failed | halted | interrupted | ...
    stopped_at TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    notes TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS devices (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id),
    device TEXT NOT NULL,
    batch INTEGER NOT NULL,
    from_image TEXT NOT NULL DEFAULT '',
    to_image TEXT NOT NULL DEFAULT '',
    phase TEXT NOT NULL DEFAULT 'waiting',
    outcome TEXT NOT NULL DEFAULT 'pending',   -- pending, ok, current, rolled_back, failed, ...
    -- unreachable or skipped
    delivery TEXT NOT NULL DEFAULT '',
    started REAL,
    ended REAL,
    error TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (rollout_id, device)
);
CREATE TABLE IF NOT EXISTS fed_runs (
    id TEXT PRIMARY KEY,           -- the run directory's name, fed-YYYYMMDD-HHMMSS-xxxx
    inventory TEXT NOT NULL,
    model TEXT NOT NULL,           -- the base GGUF on the controller
    model_sha256 TEXT NOT NULL,
    settings TEXT NOT NULL,        -- JSON: rounds, min_clients, secagg, data_dir, clients, ...
    user TEXT NOT NULL,
    controller TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started REAL NOT NULL,
    ended REAL,
    status TEXT NOT NULL,          -- running | succeeded | failed | refused | interrupted
    rounds_done INTEGER NOT NULL DEFAULT 0,
    run_dir TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT ''
);
"""
FINAL = ("ok", "current", "rolled_back", "failed", "unreachable", "skipped")


def db_path() -> Path:
    return state_dir() / "fleet.db"


@contextmanager
def connect() -> Iterator[sqlite3.Connection]:
    with open_store(db_path(), SCHEMA) as con:
        yield con


@contextmanager
def open_store(path: Path, schema: str) -> Iterator[sqlite3.Connection]:
    """A SQLite store with its schema applied, one transaction per use (shared with the
    dashboard's samples); waits up to 30 s for another process's write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=30)
    con.row_factory = sqlite3.Row
    try:
        con.executescript(schema)
        with con:
            yield con
    finally:
        con.close()


def start(rollout_id: str, kind: str, inventory: Path, image: str, image_id: str,
          settings: dict[str, Any], batches: list[list[str]]) -> None:
    """Record a new rollout and its devices, each in its planned batch, all still waiting."""
    with connect() as con:
        con.execute("INSERT INTO rollouts (id, kind, inventory, image, image_id, settings, user, "
                    "controller, pid, started, status) VALUES (?,?,?,?,?,?,?,?,?,?, 'running')",
                    (rollout_id, kind, str(inventory.resolve()), image, image_id,
                     json.dumps(settings), getpass.getuser(), socket.gethostname(), os.getpid(),
                     time.time()))
        con.executemany("INSERT INTO devices (rollout_id, device, batch, to_image) "
                        "VALUES (?,?,?,?)",
                        [(rollout_id, d, i, image) for i, b in enumerate(batches) for d in b])


def resume(rollout_id: str, note: str) -> None:
    """Take over an interrupted rollout in this process."""
    with connect() as con:
        con.execute("UPDATE rollouts SET status='running', pid=?, ended=NULL, "
                    "notes = notes || ? WHERE id=?", (os.getpid(), note, rollout_id))
        con.execute("UPDATE devices SET outcome='pending', error='' WHERE rollout_id=? AND "
                    "outcome NOT IN ('ok', 'current')", (rollout_id,))


def device_update(rollout_id: str, device: str, **fields: Any) -> None:
    if not fields:
        return
    cols = ", ".join(f"{k}=?" for k in fields)
    with connect() as con:
        con.execute(f"UPDATE devices SET {cols} WHERE rollout_id=? AND device=?",
                    (*fields.values(), rollout_id, device))


def finish(rollout_id: str, status: str, error: str = "", stopped_at: str = "") -> None:
    with connect() as con:
        con.execute("UPDATE rollouts SET status=?, error=?, stopped_at=?, ended=? WHERE id=?",
                    (status, error, stopped_at, time.time(), rollout_id))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def where_stopped(devices: list[dict[str, Any]]) -> str:
    """Which batch a rollout stopped in and what its unfinished devices were doing."""
    open_ = [d for d in devices if d["outcome"] not in FINAL]
    if not open_:
        return ""
    batch = min(d["batch"] for d in open_)
    doing = [f"{d['device']} {d['phase']}" for d in open_ if d["batch"] == batch]
    return f"batch {batch}: " + ", ".join(doing)


def _mark_interrupted(con: sqlite3.Connection) -> None:
    """A `running` rollout whose controller process is gone was interrupted: say where."""
    for row in con.execute("SELECT id, pid, controller FROM rollouts WHERE status='running'"):
        if row["controller"] == socket.gethostname() and not _alive(row["pid"]):
            devs = [dict(d) for d in con.execute(
                "SELECT * FROM devices WHERE rollout_id=? ORDER BY batch, device", (row["id"],))]
            con.execute("UPDATE rollouts SET status='interrupted', ended=?, stopped_at=?, "
                        "error='the controller stopped before the rollout finished' "
                        "WHERE id=?", (time.time(), where_stopped(devs), row["id"]))


def _with_devices(con: sqlite3.Connection, row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    out["settings"] = json.loads(out["settings"])
    out["devices"] = [dict(d) for d in con.execute(
        "SELECT * FROM devices WHERE rollout_id=? ORDER BY batch, device", (out["id"],))]
    return out


def rollouts(limit: int = 20, inventory: Path | None = None) -> list[dict[str, Any]]:
    """The newest rollouts first, each with its devices."""
    with connect() as con:
        _mark_interrupted(con)
        query, args = "SELECT * FROM rollouts", []
        if inventory is not None:
            query += " WHERE inventory=?"
            args.append(str(inventory.resolve()))
        found = con.execute(query + " ORDER BY started DESC LIMIT ?", (*args, limit)).fetchall()
        return [_with_devices(con, row) for row in found]


def get(rollout_id: str) -> dict[str, Any]:
    """One rollout by its id or the start of it (the newest that matches)."""
    with connect() as con:
        _mark_interrupted(con)
        row = con.execute("SELECT * FROM rollouts WHERE substr(id, 1, ?) = ? "
                          "ORDER BY started DESC LIMIT 1",
                          (len(rollout_id), rollout_id)).fetchone()
        if row is not None:
            return _with_devices(con, row)
    raise BadInput(f"rollout {rollout_id!r} is not in the history ({db_path()}; see "
                   "`claw fleet history`)")


def last_per_device() -> dict[str, dict[str, Any]]:
    """Each device's newest rollout row (with the rollout's id, image and start)."""
    with connect() as con:
        _mark_interrupted(con)
        out: dict[str, dict[str, Any]] = {}
        for row in con.execute("SELECT d.*, r.started AS rollout_started, r.kind, r.status "
                               "FROM devices d JOIN rollouts r ON r.id = d.rollout_id "
                               "WHERE d.outcome != 'pending' OR r.status = 'running' "
                               "ORDER BY r.started"):
            out[row["device"]] = dict(row)
    return out


def releases_per_device() -> dict[str, dict[str, Any]]:
    """Per device: the release its newest successful rollout or rollback put on it."""
    with connect() as con:
        rows = con.execute("SELECT d.device, d.to_image, r.id, r.started FROM devices d JOIN "
                           "rollouts r ON r.id = d.rollout_id WHERE d.outcome IN ('ok', "
                           "'current') ORDER BY r.started")
        return {r["device"]: dict(r) for r in rows}


def device_rollouts(device: str, limit: int = 50) -> list[dict[str, Any]]:
    """One device's rows, newest first, each with its rollout's kind, status, image and user."""
    with connect() as con:
        rows = con.execute("SELECT d.*, r.kind, r.status, r.image, r.user, r.started AS "
                           "rollout_started FROM devices d JOIN rollouts r ON r.id = "
                           "d.rollout_id WHERE d.device=? ORDER BY r.started DESC LIMIT ?",
                           (device, limit))
        return [dict(r) for r in rows]


def fed_run_start(run_id: str, inventory: Path, model: Path, model_sha256: str,
                  settings: dict[str, Any], run_dir: Path) -> None:
    """Record a federated run as it starts (before pre-flight: a refusal is history too)."""
    with connect() as con:
        con.execute("INSERT INTO fed_runs (id, inventory, model, model_sha256, settings, user, "
                    "controller, pid, started, status, run_dir) VALUES (?,?,?,?,?,?,?,?,?, "
                    "'running', ?)",
                    (run_id, str(inventory.resolve()), str(model.resolve()), model_sha256,
                     json.dumps(settings), getpass.getuser(), socket.gethostname(), os.getpid(),
                     time.time(), str(run_dir)))


def fed_run_progress(run_id: str, rounds_done: int) -> None:
    with connect() as con:
        con.execute("UPDATE fed_runs SET rounds_done=? WHERE id=?", (rounds_done, run_id))


def fed_run_finish(run_id: str, status: str, rounds_done: int, error: str = "") -> None:
    with connect() as con:
        con.execute("UPDATE fed_runs SET status=?, rounds_done=?, error=?, ended=? WHERE id=?",
                    (status, rounds_done, error, time.time(), run_id))


def _mark_fed_interrupted(con: sqlite3.Connection) -> None:
    """A `running` federated run whose controller process is gone was interrupted."""
    for row in con.execute("SELECT id, pid, controller FROM fed_runs WHERE status='running'"):
        if row["controller"] == socket.gethostname() and not _alive(row["pid"]):
            con.execute("UPDATE fed_runs SET status='interrupted', ended=?, error='the "
                        "controller stopped before the run finished' WHERE id=?",
                        (time.time(), row["id"]))


def fed_runs(limit: int = 20) -> list[dict[str, Any]]:
    """The newest federated runs first, settings decoded."""
    with connect() as con:
        _mark_fed_interrupted(con)
        rows = con.execute("SELECT * FROM fed_runs ORDER BY started DESC LIMIT ?", (limit,))
        return [dict(r) | {"settings": json.loads(r["settings"])} for r in rows]


def fed_run(run_id: str) -> dict[str, Any]:
    """One federated run by its id or the start of it (the newest that matches)."""
    with connect() as con:
        _mark_fed_interrupted(con)
        row = con.execute("SELECT * FROM fed_runs WHERE substr(id, 1, ?) = ? "
                          "ORDER BY started DESC LIMIT 1", (len(run_id), run_id)).fetchone()
        if row is not None:
            return dict(row) | {"settings": json.loads(row["settings"])}
    raise BadInput(f"federated run {run_id!r} is not in the history ({db_path()}; see "
                   "`claw fed runs`)")
