"""Real server processes on free loopback ports, for the serving tests and the benchmark."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]
CLAW = Path(sys.executable).parent / "claw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    proc: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    log: Path

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def metrics(self) -> dict[str, float]:
        """Metric samples as {'name{labels}': value}."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def metric(self, name: str, **labels: str) -> float:
        """Sum of `name` samples whose labels include `labels`."""
        total = 0.0
        for key, value in self.metrics().items():
            m = re.match(r"^([a-zA-Z_:]+)(?:\{(.*)\})?$", key)
            if not m or m[1] != name:
                continue
            have = dict(re.findall(r'(\w+)="([^"]*)"', m[2] or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += value
        return total


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def start_server(workdir: Path, config: dict[str, Any], *, name: str = "server",
                 wait_status: int | None = 200, extra_args: list[str] | None = None,
                 prefix: list[str] | None = None, env: dict[str, str] | None = None,
                 timeout: float = 60) -> Proc:
    """`claw runtime serve --config FILE` with `config` (port filled in), waiting until
    /health answers `wait_status` (None: until it answers at all)."""
    port = free_port()
    cfg_path = workdir / f"{name}.yml"
    cfg_path.write_text(yaml.safe_dump({"host": "127.0.0.1", "port": port, **config}))
    log = workdir / f"{name}.log"
    cmd = [*(prefix or []), str(CLAW), "runtime", "serve", "--config", str(cfg_path),
           *(extra_args or [])]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**_env(), **(env or {})}, cwd=REPO)
    p = Proc(proc, f"http://127.0.0.1:{port}", log)
    wait_health(p, wait_status, timeout)
    return p


def wait_health(p: Proc, status: int | None, timeout: float = 60) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.proc.poll() is not None:
            raise AssertionError(f"server exited {p.proc.returncode}:\n{p.logs()}")
        try:
            r = httpx.get(p.url + "/health", timeout=2)
            if status is None or r.status_code == status:
                return r
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    p.stop()
    raise AssertionError(f"/health never answered {status}:\n{p.logs()}")


def start_fault_proxy(workdir: Path, upstream: str, *, slow_s: float = 3.0,
                      cut_after: int = 3) -> Proc:
    port = free_port()
    log = workdir / "fault-proxy.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.fault_proxy", "--port", str(port),
         "--upstream", upstream, "--slow-s", str(slow_s), "--cut-after", str(cut_after)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
    p = Proc(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(p.url + "/_stats", timeout=2)
            return p
        except httpx.HTTPError:
            time.sleep(0.1)
    p.stop()
    raise AssertionError(f"fault proxy did not start:\n{p.logs()}")


def set_fault(proxy: Proc, mode: str) -> None:
    httpx.post(proxy.url + "/_mode", json={"mode": mode}, timeout=5).raise_for_status()


def wait_until(check, timeout: float = 20, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")
