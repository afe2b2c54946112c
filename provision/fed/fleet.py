"""Federated fine-tuning over the fleet: Flower SuperNodes on the devices, the SuperLink here.

`claw fed run` checks every device before any round (pre-flight over Ansible: the data
directory holds text, the model file hashes to the controller's, the fed image is there) and
names every device that fails, starts a SuperLink on the controller, a SuperNode container on
each device (playbooks/fed_clients.yml), waits until enough of them are online, hands the run to
the Flower apps, follows `rounds.jsonl` in the run directory, and always stops the clients and
the SuperLink. The run is recorded in the rollout history store (`fed_runs`).

The SuperLink and the submitted run belong to `runtime.fed.federation` (the Flower side);
until it offers them, `start_superlink` starts Flower's own `flower-superlink` here.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from provision.errors import BadInput, ClawError
from provision.fed.runs import file_sha256, runs_dir

PLAYBOOK = "fed_clients.yml"
DEVICE_MODEL_DIR = "/var/lib/clawforge/models"  # where the claw_runtime role puts models
GGUF_MAGIC = b"GGUF"
NODES_TIMEOUT_S = 120.0


def new_run_id() -> str:
    return time.strftime("fed-%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def run_dir(run_id: str) -> Path:
    return runs_dir() / run_id


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Temp file + rename: a reader never sees half a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


@dataclass
class FedSettings:
    """What one federated run was asked for; checked before anything touches a device."""

    model: Path  # the base GGUF on the controller
    data_dir: str  # the directory of *.txt on each device
    rounds: int
    min_clients: int | None = None  # None: every device
    secagg: bool = True
    server_address: str | None = None  # how devices reach the controller; None: found
    device_model: str | None = None  # the GGUF on each device; None: DEVICE_MODEL_DIR/model.name
    image: str | None = None  # the fed image; None: each host's profile's default tag
    local_steps: int = 5
    lr: float = 5e-4

    def model_on_device(self) -> str:
        return self.device_model or f"{DEVICE_MODEL_DIR}/{self.model.name}"

    def record(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "min_clients": self.min_clients, "secagg": self.secagg,
                "data_dir": self.data_dir, "device_model": self.model_on_device(),
                "server_address": self.server_address, "image": self.image,
                "local_steps": self.local_steps, "lr": self.lr}


def check_settings(s: FedSettings, hosts: list[str]) -> None:
    """Bad input, one line each, before the history or any device is touched."""
    if not s.model.is_file():
        raise BadInput(f"--model {s.model}: not a file (expected the base model, a GGUF file)")
    with s.model.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise BadInput(f"--model {s.model}: not a GGUF file (expected the runtime's model "
                           "format, magic 'GGUF')")
    for name, path in (("--data-dir", s.data_dir), ("--device-model", s.device_model)):
        if path is not None and not path.startswith("/"):
            raise BadInput(f"{name} {path!r}: expected an absolute path on the devices")
    if s.rounds < 1:
        raise BadInput(f"--rounds {s.rounds}: expected at least 1")
    if s.min_clients is not None and not 1 <= s.min_clients <= len(hosts):
        raise BadInput(f"--min-clients {s.min_clients}: expected 1 to {len(hosts)} (the "
                       "inventory's devices)")
    if s.secagg and len(hosts) < 2:
        raise BadInput("--secagg needs at least 2 devices (a sum over one client is that "
                       "client's update); use --no-secagg")
    if s.local_steps < 1 or s.lr <= 0:
        raise BadInput(f"--local-steps {s.local_steps} / --lr {s.lr}: expected positive values")


def fleet_hosts(inventory: Path) -> dict[str, dict[str, Any]]:
    """The inventory's devices (checked by the inventory loader), in file order."""
    from provision.inventory import load_inventory

    inv = load_inventory(inventory)
    return {name: host.effective() for name, host in inv.hosts.items()}


def images_for(hosts: dict[str, dict[str, Any]], image: str | None) -> dict[str, str]:
    """Each device's fed image: the one named, or its profile's `--extra fed` numpy tag."""
    from images.render import resolve

    if image:
        return {h: image for h in hosts}
    return {h: resolve("runtime", e["profile"], None, "none", ("fed",)).default_tag
            for h, e in hosts.items()}


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(address)).is_loopback
    except (OSError, ValueError):
        return False


def server_address_for(hosts: dict[str, dict[str, Any]], given: str | None) -> str:
    """How the devices reach the controller: given, loopback for emulated devices (they share
    this machine's network), else this machine's address on the route to the first device."""
    if given:
        return given
    addresses = [e["address"] for e in hosts.values()]
    if all(is_loopback(a) for a in addresses):
        return "127.0.0.1"
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((socket.gethostbyname(addresses[0]), 9))  # no packet is sent
        return probe.getsockname()[0]
    except OSError as exc:
        raise BadInput(f"cannot find this machine's address towards {addresses[0]} ({exc}); "
                       "give --server-address") from None
    finally:
        probe.close()


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports free now (the kernel's choice, held until all are picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ---- pre-flight ----------------------------------------------------------------------------

@dataclass
class DeviceCheck:
    host: str
    data_dir_exists: bool = False
    texts: int = 0
    model_exists: bool = False
    model_sha256: str = ""
    image: str = ""
    image_id: str = ""
    error: str = ""  # unreachable, or the play failed on it

    def problems(self, want_sha256: str) -> list[str]:
        if self.error:
            return [self.error]
        out = []
        if not self.data_dir_exists:
            out.append("data dir missing")
        elif not self.texts:
            out.append("data dir holds no *.txt")
        if not self.model_exists:
            out.append("model file missing")
        elif self.model_sha256 != want_sha256:
            out.append(f"model sha256 {self.model_sha256[:12]}… differs from the controller's "
                       f"{want_sha256[:12]}…")
        if not self.image_id:
            out.append(f"image {self.image} not on the device")
        return out


def _ansible(inventory: Path, action: str, extravars: dict[str, Any]):
    from provision.ansible import run_playbook

    return run_playbook(PLAYBOOK, inventory, extravars={"claw_fed_action": action, **extravars},
                        kind=f"fed-{action}")


def preflight(inventory: Path, hosts: list[str], settings: FedSettings, images: dict[str, str],
              model_sha256: str) -> list[DeviceCheck]:
    """Every device's state; BadInput naming each failing device and why, before any round."""
    result = _ansible(inventory, "preflight", {
        "claw_fed_client_data_dir": settings.data_dir,
        "claw_fed_client_model": settings.model_on_device(), "claw_fed_images": images})
    checks = []
    for host in hosts:
        hr = result.hosts.get(host)
        check = DeviceCheck(host, image=images[host])
        fact = ((hr.results.get("Report the pre-flight") or {}).get("ansible_facts", {})
                .get("claw_fed_client_preflight")) if hr else None
        if hr is None:
            check.error = "no result (not in the play)"
        elif hr.unreachable or hr.failed or not fact:
            check.error = f"{'unreachable' if hr.unreachable else 'failed'}: " \
                          f"{hr.message or hr.failed_task or 'no pre-flight report'}"
        else:
            check.data_dir_exists = _true(fact["data_dir_exists"])
            check.texts = int(fact["texts"])
            check.model_exists = _true(fact["model_exists"])
            check.model_sha256 = fact["model_sha256"]
            check.image_id = fact["image_id"]
        checks.append(check)
    refused = [f"{c.host}: {'; '.join(p)}" for c in checks if (p := c.problems(model_sha256))]
    if refused:
        raise BadInput(f"refused before the first round ({len(refused)} of {len(hosts)} "
                       f"devices not ready; data dir {settings.data_dir}, model "
                       f"{settings.model_on_device()}): " + " | ".join(refused))
    return checks


def _true(value: Any) -> bool:
    return value is True or str(value).lower() == "true"


# ---- the SuperLink (runtime.fed.federation's when present) --------------------------------

CONNECTION = "clawforge"  # the `flwr` CLI's name for the SuperLink, in its FLWR_HOME config


@dataclass
class SuperLink:
    """A SuperLink on this machine, shaped like runtime.fed.federation's: the address the
    devices dial (Fleet and Control share one port in Flower 1.42), the FLWR_HOME whose
    config names it for the `flwr` CLI, and how to stop it."""

    address: str
    home: Path
    process: subprocess.Popen
    log: Path

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 20) -> str:
        return _tail(self.log, lines)

    def stop(self) -> None:
        if self.alive:
            os.killpg(self.process.pid, signal.SIGTERM)  # with the SuperExec it started
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _venv_path() -> str:
    """Flower's SuperLink starts `flower-superexec` by name: this Python's scripts first."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def _tool(name: str) -> str:
    found = shutil.which(name, path=_venv_path())
    if not found:
        raise ClawError(f"{name} is not installed (pip install 'clawforge[fed]')")
    return found


def start_superlink(work: Path, bind: str, advertise: str) -> Any:
    """A SuperLink listening on `bind`, dialled as `advertise`: runtime.fed.federation's
    `start_superlink` when this build has it, else Flower's `flower-superlink` started here
    the same way (free port, insecure: the fleet's own network)."""
    try:
        from runtime.fed import federation as fed
    except ImportError:
        fed = None
    if fed is not None and hasattr(fed, "start_superlink"):
        return fed.start_superlink(work, host=bind, advertise=advertise)
    port = free_ports(1, bind if bind != "0.0.0.0" else "127.0.0.1")[0]
    home = work / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{advertise}:{port}"\ninsecure = true\n')
    log = work / "superlink.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [_tool("flower-superlink"), "--insecure", "--host", bind, "--port", str(port),
             "--database", str(work / "state.db")],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PATH": _venv_path(), "FLWR_HOME": str(home)},
            start_new_session=True)
    link = SuperLink(f"{advertise}:{port}", home, process, log)
    deadline = time.monotonic() + 60
    while True:
        if not link.alive:
            raise ClawError(f"flower-superlink exited with {process.returncode}: {link.tail(3)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return link
        if time.monotonic() > deadline:
            link.stop()
            raise ClawError(f"flower-superlink did not listen in 60 s: {link.tail(3)}")
        time.sleep(0.3)


def _tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return " / ".join(ln.strip() for ln in text.strip().splitlines()[-lines:]) or "(no output)"


def supernodes(link: Any) -> list[dict[str, Any]]:
    """The SuperNodes the SuperLink knows (`flwr supernode list`), online or not."""
    env = {**os.environ, "FLWR_HOME": str(link.home), "PATH": _venv_path()}
    default = CONNECTION
    with contextlib.suppress(OSError, ValueError):
        import tomllib

        default = tomllib.loads((Path(link.home) / "config.toml").read_text())["superlink"][
            "default"]
    done = subprocess.run([_tool("flwr"), "supernode", "list", default, "--format", "json"],
                          capture_output=True, text=True, timeout=60, env=env)
    try:
        data = json.loads(done.stdout[done.stdout.index("{"):])
    except ValueError:
        raise ClawError(f"flwr supernode list failed: {(done.stderr or done.stdout)[-300:]}"
                        ) from None
    if not data.get("success"):
        raise ClawError(f"flwr supernode list failed: {data.get('error-message', data)}")
    return data.get("nodes", [])


def wait_for_nodes(link: Any, want: int, timeout: float = NODES_TIMEOUT_S,
                   on_change: Callable[[int], None] = lambda n: None) -> list[dict[str, Any]]:
    """Until `want` SuperNodes are online at the SuperLink; ClawError naming how many came."""
    deadline, seen = time.monotonic() + timeout, -1
    while True:
        online = [n for n in supernodes(link) if n.get("status") == "online"]
        if len(online) != seen:
            seen = len(online)
            on_change(seen)
        if seen >= want:
            return online
        if time.monotonic() > deadline:
            raise ClawError(f"only {seen} of {want} SuperNodes came online at the SuperLink "
                            f"{link.address} in {timeout:.0f} s (see the devices' "
                            "claw-fed-supernode logs)")
        time.sleep(1)


# ---- clients over Ansible ------------------------------------------------------------------

def start_clients(inventory: Path, settings: FedSettings, superlink: str,
                  images: dict[str, str], ports: dict[str, int]) -> None:
    """A SuperNode container on every device; ClawError naming the devices where it failed."""
    result = _ansible(inventory, "start", {
        "claw_fed_client_superlink": superlink, "claw_fed_client_data_dir": settings.data_dir,
        "claw_fed_client_model": settings.model_on_device(), "claw_fed_images": images,
        "claw_fed_ports": ports})
    failed = [f"{h}: {r.message or r.failed_task}" for h, r in result.hosts.items()
              if r.failed or r.unreachable]
    if failed or result.rc != 0:
        raise ClawError("starting the SuperNodes failed: " + (" | ".join(failed) or
                        f"ansible-playbook exited {result.rc} ({result.artifacts})"))


def stop_clients(inventory: Path) -> dict[str, list[str]]:
    """Remove every device's SuperNode container (any time, twice, after a failure); each
    device's last log lines."""
    result = _ansible(inventory, "stop", {})
    logs = {}
    for host, hr in result.hosts.items():
        fact = (hr.results.get("Report the stop") or {}).get("ansible_facts", {})
        logs[host] = list((fact.get("claw_fed_client_stopped") or {}).get("logs") or [])
    return logs


# ---- the run -------------------------------------------------------------------------------

def read_rounds(path: Path) -> list[dict[str, Any]]:
    """The finished rounds so far (a line still being written is left for the next read)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def follow_rounds(path: Path, finished: Callable[[], bool], poll_s: float = 0.5
                  ) -> Iterator[dict[str, Any]]:
    """Each round record as it appears in `rounds.jsonl`, until `finished()` and all read."""
    seen = 0
    while True:
        done = finished()
        rounds = read_rounds(path)
        yield from rounds[seen:]
        seen = len(rounds)
        if done:
            return
        time.sleep(poll_s)


def federation() -> Any:
    """runtime.fed.federation: submits the Flower apps and follows the run (the fed extra)."""
    try:
        from runtime.fed import federation as fed
    except ImportError as exc:
        raise ClawError(f"claw fed run needs the fed extra ({exc}); expected it installed: "
                        "pip install 'clawforge[fed]'") from None
    return fed


def submit_and_follow(link: Any, settings: FedSettings, directory: Path, model_sha256: str,
                      clients: int) -> Iterator[dict[str, Any]]:
    """Submit the run to the SuperLink and yield each round's record as it is written."""
    fed = federation()
    from runtime.fed.settings import RunSettings

    run_settings = RunSettings.from_run_config(run_config(settings, directory, model_sha256,
                                                          clients))
    run_id = fed.submit(link, run_settings)
    yield from fed.follow(directory, link, run_id)


def run_config(settings: FedSettings, directory: Path, model_sha256: str, clients: int
               ) -> dict[str, Any]:
    """The Flower run config (kebab-case keys, as the ServerApp reads them)."""
    return {"num-rounds": settings.rounds, "local-steps": settings.local_steps,
            "lr": settings.lr, "secagg": settings.secagg,
            "min-clients": settings.min_clients or clients, "run-dir": str(directory),
            "model-sha256": model_sha256}


@dataclass
class FedRun:
    id: str
    dir: Path
    clients: list[str]
    status: str = "running"  # succeeded | failed | refused | interrupted
    rounds_done: int = 0
    error: str = ""
    client_logs: dict[str, list[str]] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"id": self.id, "run_dir": str(self.dir), "clients": self.clients,
                "status": self.status, "rounds_done": self.rounds_done, "error": self.error}


def run_federation(inventory: Path, settings: FedSettings,
                   on_phase: Callable[[str], None] = lambda p: None,
                   on_round: Callable[[dict[str, Any]], None] = lambda r: None) -> FedRun:
    """One federated run over the inventory's devices, recorded in the history store; the
    clients and the SuperLink are stopped whatever happens. Bad input and a refused
    pre-flight raise BadInput, a failed run ClawError, after the record is closed."""
    from provision.fleet import history

    hosts = fleet_hosts(inventory)
    names = list(hosts)
    check_settings(settings, names)
    model_sha256 = file_sha256(settings.model)
    images = images_for(hosts, settings.image)
    address = server_address_for(hosts, settings.server_address)
    run = FedRun(new_run_id(), Path(), names)
    run.dir = run_dir(run.id)
    run.dir.mkdir(parents=True)
    history.fed_run_start(run.id, inventory, settings.model, model_sha256,
                          settings.record() | {"clients": names, "images": images}, run.dir)
    started = _utc_now()
    write_json(run.dir / "run.json", _run_json(run, settings, model_sha256, started))
    link: Any = None
    clients_up = False
    try:
        on_phase(f"pre-flight on {len(names)} devices")
        preflight(inventory, names, settings, images, model_sha256)
        on_phase("starting the SuperLink")
        link = start_superlink(run.dir, "127.0.0.1" if is_loopback(address) else "0.0.0.0",
                               address)
        on_phase(f"starting {len(names)} SuperNodes (SuperLink {link.address})")
        clients_up = True
        start_clients(inventory, settings, link.address, images,
                      dict(zip(names, free_ports(len(names)), strict=True)))
        want = settings.min_clients or len(names)
        wait_for_nodes(link, want, on_change=lambda n: on_phase(f"{n}/{want} SuperNodes online"))
        on_phase("training")
        for record in submit_and_follow(link, settings, run.dir, model_sha256, len(names)):
            run.rounds_done = max(run.rounds_done, int(record.get("round", 0)))
            history.fed_run_progress(run.id, run.rounds_done)
            on_round(record)
        final = json.loads((run.dir / "run.json").read_text()).get("status", "")
        run.status = "succeeded" if run.rounds_done >= settings.rounds and final != "failed" \
            else "failed"
        if run.status == "failed":
            run.error = f"the run ended after {run.rounds_done} of {settings.rounds} rounds"
    except BadInput as exc:
        run.status, run.error = ("refused" if not clients_up else "failed"), str(exc)
        raise
    except KeyboardInterrupt:
        run.status, run.error = "interrupted", "stopped by the user (Ctrl-C)"
        raise
    except ClawError as exc:
        run.status, run.error = "failed", str(exc)
        raise
    except Exception as exc:  # Flower's side (FederationError, a subprocess timing out)
        run.status, run.error = "failed", f"{type(exc).__name__}: {exc}"
        raise ClawError(f"federated run {run.id} failed: {run.error}") from exc
    finally:
        if clients_up:
            on_phase("stopping the SuperNodes")
            run.client_logs = stop_clients(inventory)
            for host, lines in run.client_logs.items():  # for a failed run's post-mortem
                (run.dir / f"supernode-{host}.log").write_text("\n".join(lines) + "\n")
        if link is not None:
            link.stop()
        history.fed_run_finish(run.id, run.status, run.rounds_done, run.error)
        _close_run_json(run, settings, model_sha256, started)
    if run.status != "succeeded":
        raise ClawError(f"federated run {run.id} failed: {run.error}")
    return run


def _utc_now() -> str:
    """Timestamps in run.json as the ServerApp writes them (ISO 8601, UTC)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _run_json(run: FedRun, s: FedSettings, sha: str, started: str) -> dict[str, Any]:
    return {"id": run.id, "model": str(s.model.resolve()), "model_sha256": sha,
            "rounds": s.rounds, "secagg": s.secagg, "status": run.status, "started": started,
            "ended": None, "clients": run.clients}


def _close_run_json(run: FedRun, s: FedSettings, sha: str, started: str) -> None:
    """The final status, keeping what the ServerApp wrote (its LoRA settings, its clients)
    and the contract's keys it may leave out (id, the controller's model path)."""
    path = run.dir / "run.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        data = {}
    status = "succeeded" if run.status == "succeeded" else "failed"
    write_json(path, _run_json(run, s, sha, started) | data | {"status": status,
                                                                "ended": _utc_now()})
