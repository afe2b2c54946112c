"""A small driver over ansible-runner's Python API.

Each run gets its own private data directory under the state directory (kept: it holds the
runner's artifacts for later inspection), and the runner's events are folded into a per-host
result: the outcome, the failing task and message, and what registered tasks returned.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from provision.errors import ClawError
from provision.paths import state_dir


def playbooks_dir() -> Path:
    return Path(str(resources.files("playbooks")))


@dataclass
class HostResult:
    host: str
    ok: int = 0
    changed: int = 0
    failed: bool = False
    unreachable: bool = False
    skipped: int = 0
    failed_task: str = ""
    message: str = ""
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # task name → module result


@dataclass
class RunResult:
    run_id: str
    artifacts: Path
    status: str
    rc: int
    hosts: dict[str, HostResult]


def result_message(res: dict[str, Any], limit: int = 500) -> str:
    """What a failed task said, on one line: a command's own stderr rather than Ansible's
    "non-zero return code"."""
    msg, stderr = res.get("msg") or "", res.get("stderr") or ""
    text = stderr if stderr and (not msg or msg == "non-zero return code") else (
        msg or res.get("module_stderr") or "")
    return " ".join(str(text).split())[:limit]


def new_run_dir(kind: str) -> tuple[str, Path]:
    """A fresh private data directory for one run, kept under the state directory."""
    run_id = time.strftime("%Y%m%d-%H%M%S-") + f"{kind}-" + uuid.uuid4().hex[:6]
    private = state_dir() / "runs" / run_id
    private.mkdir(parents=True, exist_ok=True)
    return run_id, private


def run_playbook(
    playbook: str,
    inventory: Path,
    *,
    extravars: dict[str, Any] | None = None,
    limit: str | None = None,
    tags: list[str] | None = None,
    check: bool = False,
    diff: bool = False,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    kind: str = "run",
    run: tuple[str, Path] | None = None,
) -> RunResult:
    """Run `playbooks/<playbook>` against `inventory` and fold its events per host."""
    try:
        import ansible_runner
    except ImportError:
        raise ClawError("ansible-runner is not installed (pip install 'clawforge[controller]'; "
                        "see `claw doctor`)") from None
    run_id, private = run or new_run_dir(kind)
    # ansible-runner starts `ansible-playbook` by name: make the one beside this Python findable.
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + path
    hosts: dict[str, HostResult] = {}

    def handle(event: dict[str, Any]) -> bool:
        data = event.get("event_data", {})
        host = data.get("host")
        if host:
            hr = hosts.setdefault(host, HostResult(host))
            kind_ = event.get("event", "")
            res = data.get("res", {}) or {}
            task = data.get("task", "")
            if kind_ == "runner_on_ok":
                hr.ok += 1
                hr.changed += bool(res.get("changed"))
                hr.results[task] = res
            elif kind_ == "runner_on_failed" and not data.get("ignore_errors"):
                hr.failed, hr.failed_task, hr.message = True, task, result_message(res)
            elif kind_ == "runner_on_unreachable":
                hr.unreachable, hr.failed_task, hr.message = True, task, result_message(res)
            elif kind_ == "runner_on_skipped":
                hr.skipped += 1
        if on_event:
            on_event(event)
        return True

    runner = ansible_runner.run(
        private_data_dir=str(private),
        project_dir=str(playbooks_dir()),
        playbook=str(playbooks_dir() / playbook),
        inventory=str(inventory.resolve()),
        extravars=extravars or {},
        limit=limit,
        tags=",".join(tags) if tags else None,
        cmdline=" ".join(flag for flag, on in (("--check", check), ("--diff", diff)) if on) or None,
        quiet=True,
        event_handler=handle,
        envvars={"ANSIBLE_NOCOLOR": "1", "ANSIBLE_RETRY_FILES_ENABLED": "0"},
    )
    return RunResult(run_id=run_id, artifacts=private, status=runner.status, rc=runner.rc,
                     hosts=hosts)
