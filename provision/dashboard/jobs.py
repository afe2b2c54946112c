"""Actions started from the page run as `claw` subprocesses, exactly as from a shell.

A subprocess keeps the rollout driver's own signal handling and history records (it writes
fleet.db as it goes, which is what the page streams), and a dashboard restart does not take a
running rollout down with it. One action runs at a time: two rollouts over the same devices
would fight.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.errors import ClawError
from provision.fleet import history
from provision.paths import state_dir

ENTRY = "from provision.cli import main; main()"


@dataclass
class Job:
    id: str
    kind: str  # rollout | rollback | provision
    argv: list[str]
    log: Path
    proc: subprocess.Popen = field(repr=False)
    started: float = field(default_factory=time.time)
    rollout_id: str = ""

    @property
    def rc(self) -> int | None:
        return self.proc.poll()

    def output(self, limit: int = 20000) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""
        return text[-limit:]

    def find_rollout(self) -> str:
        """The history row this job's process wrote (rollouts record their pid)."""
        if not self.rollout_id and self.kind in ("rollout", "rollback"):
            for row in history.rollouts(limit=10):
                if row["pid"] == self.proc.pid and row["started"] >= self.started - 1:
                    self.rollout_id = row["id"]
        return self.rollout_id

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "command": " ".join(["claw", *self.argv]),
                "rc": self.rc, "running": self.rc is None, "rollout_id": self.find_rollout(),
                "output": self.output(4000)}


class Jobs:
    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()

    def running(self) -> Job | None:
        return next((j for j in self.jobs.values() if j.rc is None), None)

    def start(self, kind: str, argv: list[str]) -> Job:
        with self.lock:
            busy = self.running()
            if busy is not None:
                raise ClawError(f"an action is running already ({busy.kind}, job {busy.id}): "
                                "wait for it to end")
            job_id = uuid.uuid4().hex[:10]
            folder = state_dir() / "dashboard-jobs"
            folder.mkdir(parents=True, exist_ok=True)
            log = folder / f"{job_id}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen([sys.executable, "-c", ENTRY, *argv], stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=_env())
            job = self.jobs[job_id] = Job(job_id, kind, argv, log, proc)
            return job

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def stop_all(self) -> None:
        """Leave nothing behind: a rollout interrupted this way is recorded as interrupted."""
        for job in self.jobs.values():
            if job.rc is None:
                job.proc.terminate()
        for job in self.jobs.values():
            try:
                job.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                job.proc.kill()


def _env() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "160", "NO_COLOR": "1"}
