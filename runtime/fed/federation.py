"""Start a Flower SuperLink and SuperNodes, submit the app, follow its rounds, stop everything.

The processes are Flower's own (`flower-superlink`, `flower-supernode`, `flwr run`); this
module only picks free ports, writes the `flwr` CLI's connection config (a private
FLWR_HOME per SuperLink), and follows the run directory the ServerApp writes. Everything
started here is stopped by `stop()` (process groups, and the children Flower detaches).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.fed.settings import RunSettings

APP_DIR = Path(__file__).parent / "app"
CONNECTION = "clawforge"


class FederationError(RuntimeError):
    """A Flower process did not start, or the run failed."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def new_run_id() -> str:
    return time.strftime("fed-%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(2)


def _bin(name: str) -> str:
    """Flower's console scripts beside this interpreter (a venv need not be on PATH)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def _env(home: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if home is not None:
        env["FLWR_HOME"] = str(home)
    return env


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Flower detaches its SuperExec into a new session)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parts = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(parts[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@dataclass
class FlowerProcess:
    """A Flower process and everything it started, stopped together."""

    process: subprocess.Popen[bytes]
    log: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL now (a device that vanishes), with what it started."""
        self.stop(grace=0.0)

    def stop(self, grace: float = 5.0) -> None:
        pids = [self.process.pid, *_descendants(self.process.pid)]
        sig = signal.SIGTERM if grace > 0 else signal.SIGKILL
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_running(p) for p in pids):
            time.sleep(0.1)
        for pid in pids:
            if _running(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def _wait_port(host: str, port: int, proc: FlowerProcess, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive:
            raise FederationError(f"{what} exited at start:\n{proc.tail()}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    proc.stop()
    raise FederationError(f"{what} did not listen on {host}:{port} in {timeout:.0f} s")


@dataclass
class Superlink(FlowerProcess):
    address: str = ""  # host:port of its Fleet and Control APIs (HTTP, one port)
    home: Path = Path()  # FLWR_HOME holding the `flwr` CLI's connection to it


def start_superlink(workdir: str | os.PathLike[str], *, host: str = "127.0.0.1",
                    port: int | None = None, advertise: str | None = None,
                    timeout: float = 60.0) -> Superlink:
    """A SuperLink listening on host:port (free port when None), insecure (loopback/tests or
    a trusted LAN). `advertise`: the host nodes should dial when `host` is 0.0.0.0."""
    work = Path(workdir)
    port = port or free_port(host if host != "0.0.0.0" else "127.0.0.1")
    home = work / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    dial = f"{advertise or ('127.0.0.1' if host == '0.0.0.0' else host)}:{port}"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{dial}"\ninsecure = true\n')
    cmd = [_bin("flower-superlink"), "--insecure", "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation", "--database", str(work / "state.db")]
    env = _env(home)
    link = Superlink(_spawn(cmd, work / "superlink.log", env), work / "superlink.log",
                     address=dial, home=home)
    _wait_port(dial.rsplit(":", 1)[0], port, link, "flower-superlink", timeout)
    return link


def start_supernode(superlink: str, *, model: str | os.PathLike[str],
                    data_dir: str | os.PathLike[str], workdir: str | os.PathLike[str],
                    name: str = "", extra_config: dict[str, str] | None = None) -> FlowerProcess:
    """A local SuperNode (a process on this machine) with the contract's node config."""
    work = Path(workdir)
    config = {"model": str(model), "data-dir": str(data_dir), "name": name,
              **(extra_config or {})}
    node_config = " ".join(f"{k}={json.dumps(str(v))}" for k, v in config.items())
    port = free_port()
    cmd = [_bin("flower-supernode"), "--insecure", "--superlink", superlink,
           "--node-config", node_config, "--port", str(port)]
    log = work / f"supernode-{name or port}.log"
    return FlowerProcess(_spawn(cmd, log, _env(work / f"home-{name or port}")), log,
                         extra={"name": name, "port": port})


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def submit(superlink: Superlink, settings: RunSettings) -> int:
    """`flwr run` of the app with this run config; the SuperLink's run id."""
    if not settings.run_dir:
        raise FederationError("run-dir is empty (expected the run directory)")
    app = superlink.home / "app"  # a copy: `flwr run` may migrate the app's pyproject in place
    shutil.rmtree(app, ignore_errors=True)
    shutil.copytree(APP_DIR, app)
    overrides = " ".join(f"{k}={_toml(v)}" for k, v in settings.to_run_config().items())
    proc = subprocess.run([_bin("flwr"), "run", str(app), CONNECTION, "--run-config",
                           overrides, "--format", "json"], capture_output=True, text=True,
                          env=_env(superlink.home), timeout=120)
    try:
        reply = json.loads(proc.stdout[proc.stdout.index("{"):])
        return int(reply["run-id"])
    except (ValueError, KeyError, TypeError):
        raise FederationError(f"flwr run failed (exit {proc.returncode}): "
                              f"{(proc.stdout + proc.stderr).strip()[-2000:]}") from None


def run_status(superlink: Superlink, run_id: int) -> str:
    """Flower's status of the run, e.g. 'running', 'finished:completed', 'finished:failed'."""
    proc = subprocess.run([_bin("flwr"), "ls", CONNECTION, "--run-id", str(run_id),
                           "--format", "json"], capture_output=True, text=True,
                          env=_env(superlink.home), timeout=60)
    try:
        reply = json.loads(proc.stdout[proc.stdout.index("{"):])
        return str(reply["runs"][0]["status"])
    except (ValueError, KeyError, IndexError, TypeError):
        return "unknown"


def stop_run(superlink: Superlink, run_id: int) -> None:
    subprocess.run([_bin("flwr"), "stop", str(run_id), CONNECTION], capture_output=True,
                   env=_env(superlink.home), timeout=60, check=False)


def follow(run_dir: str | os.PathLike[str], superlink: Superlink, run_id: int, *,
           timeout: float = 3600.0, poll: float = 0.5) -> Iterator[dict[str, Any]]:
    """Yield each `rounds.jsonl` record as it appears; return when the run succeeded, raise
    FederationError when it failed (the ServerApp's reason from run.json) or timed out."""
    folder = Path(run_dir)
    rounds, seen = folder / "rounds.jsonl", 0
    deadline = time.monotonic() + timeout
    last_check = 0.0
    while True:
        lines = rounds.read_text().splitlines() if rounds.is_file() else []
        for line in lines[seen:]:
            yield json.loads(line)
        seen = len(lines)
        record = _read_json(folder / "run.json")
        if record.get("status") == "succeeded":
            return
        if record.get("status") == "failed":
            raise FederationError(str(record.get("error", "the ServerApp failed")))
        if not superlink.alive:
            raise FederationError(f"flower-superlink exited:\n{superlink.tail()}")
        if time.monotonic() - last_check > 5:
            last_check = time.monotonic()
            status = run_status(superlink, run_id)
            if status.startswith("finished"):
                record = _read_json(folder / "run.json")  # the ServerApp's own account first
                if record.get("status") == "failed":
                    raise FederationError(str(record.get("error", "the ServerApp failed")))
                if record.get("status") != "succeeded":
                    raise FederationError(f"run {run_id} {status} without a result in {folder}"
                                          f" (see {superlink.log})")
        if time.monotonic() > deadline:
            stop_run(superlink, run_id)
            raise FederationError(f"run {run_id} did not finish in {timeout:.0f} s")
        time.sleep(poll)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
