"""Shared test helpers: run `claw` in-process or as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLAW = Path(sys.executable).parent / "claw"


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def claw(capsys, monkeypatch):
    """Run the CLI in-process through its real entry point (`provision.cli:main`)."""
    from provision.cli import main

    monkeypatch.setenv("COLUMNS", "200")

    def run(*args: str) -> Result:
        monkeypatch.setattr(sys, "argv", ["claw", *args])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def claw_subprocess(*args: str, env: dict[str, str] | None = None,
                    cwd: Path | None = None, timeout: float = 300) -> Result:
    """Run the installed `claw` as a user would, in its own process."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    done = subprocess.run([str(CLAW), *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd or REPO, timeout=timeout)
    return Result(done.returncode, done.stdout, done.stderr)


TIERS = {"unit", "integration", "e2e", "gpu"}
SLOW_PHASE_S = 60.0


def pytest_runtest_logreport(report):
    """Name every test phase that took a minute or more, with the wall clock, as it ends.

    `--durations` prints only when the session finishes; a CI run killed at its time limit
    would otherwise leave no trace of where its time went."""
    if report.duration >= SLOW_PHASE_S:
        import time
        sys.stderr.write(f"\n[slow {report.duration:6.0f} s, {time.strftime('%H:%M:%S')}] "
                         f"{report.nodeid} ({report.when})\n")


def pytest_collection_modifyitems(config, items):
    """Every test belongs to exactly one tier, so `-m` selections never miss one silently."""
    for item in items:
        tiers = {m.name for m in item.iter_markers()} & TIERS
        if len(tiers) != 1:
            raise pytest.UsageError(f"{item.nodeid}: expected exactly one tier marker of "
                                    f"{sorted(TIERS)}, found {sorted(tiers) or 'none'}")


def dexec(name: str, command: str) -> str:
    """Run a shell command inside an emulated device (a container) and return its stdout."""
    done = subprocess.run(["docker", "exec", name, "sh", "-c", command], capture_output=True,
                          text=True, timeout=120)
    return done.stdout.strip()
