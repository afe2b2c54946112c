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


GUARD = """#!{python}
# Written by ClawForge (provision/ansible.py): ansible-playbook that ends with its controller.
# ansible-runner starts it under a pty that ignores SIGHUP, so a controller killed mid-run
# left it running alone (a rollout going on unwatched, or spinning forever). The kernel sends
# it SIGINT when the process that started it dies: Ansible stops its workers and exits.
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGINT), 0, 0, 0)  # PR_SET_PDEATHSIG
if str(os.getppid()) != os.environ.get("CLAW_CONTROLLER_PID", str(os.getppid())):
    sys.exit("ansible-playbook: the ClawForge controller that started it is gone")
real = {real!r}
os.execv(real, [real, *sys.argv[1:]])
"""


def playbook_guard() -> Path:
    """The `ansible-playbook` ClawForge runs: the real one, bound to the controller's life."""
    real = str(Path(sys.executable).parent / "ansible-playbook")
    text = GUARD.format(python=sys.executable, real=real)
    guard = state_dir() / "bin" / "ansible-playbook"
    if not guard.is_file() or guard.read_text() != text:
        guard.parent.mkdir(parents=True, exist_ok=True)
        tmp = guard.with_name(f".ansible-playbook.{os.getpid()}")
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(tmp, guard)
    return guard


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
    # ansible-runner starts `ansible-playbook` by name: the one found first is our guard, which
    # runs the one beside this Python.
    guard_dir = str(playbook_guard().parent)
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p != guard_dir]
    os.environ["PATH"] = os.pathsep.join([guard_dir, str(Path(sys.executable).parent), *path])
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
        # Given a cancel callback, ansible-runner installs no SIGINT/SIGTERM handlers of its
        # own (which would cancel only the playbook running and let the caller go on): Ctrl-C
        # reaches the caller as KeyboardInterrupt, which records where the work stopped.
        cancel_callback=lambda: False,
        envvars={"ANSIBLE_NOCOLOR": "1", "ANSIBLE_RETRY_FILES_ENABLED": "0",
                 "CLAW_CONTROLLER_PID": str(os.getpid())},
    )
    return RunResult(run_id=run_id, artifacts=private, status=runner.status, rc=runner.rc,
                     hosts=hosts)
