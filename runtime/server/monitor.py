"""How much memory the device (and this runtime's own container) has left, from what the
kernel reports: PSI (/proc/pressure/memory), MemAvailable, the cgroup v2 or v1 memory limit and
usage of the cgroup this process runs in, swap and zram use, and OpenCL device memory in use
when the backend reports it. `PressureMonitor` turns those readings into one decision,
"under pressure or not", with hysteresis (enter past a threshold, leave only after every signal
has been back below ratio × threshold for hold_s) so offload does not flap.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("claw.serve.monitor")

UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a huge page-rounded number


@dataclass(frozen=True)
class Thresholds:
    psi_some_avg10: float = 10.0
    mem_available_min_fraction: float = 0.15
    cgroup_usage_max_fraction: float = 0.9
    swap_used_max_fraction: float = 0.5
    gpu_memory_max_fraction: float = 0.9
    clear_ratio: float = 0.8
    hold_s: float = 5.0


def thresholds_for(monitor: Any) -> Thresholds:
    """The profile's `pressure:` thresholds (if `monitor.profile`), then the config's own."""
    values: dict[str, float] = {}
    if monitor.profile:
        from provision.profiles import ProfileStore

        values.update(ProfileStore().get(monitor.profile).pressure.model_dump())
    for name in Thresholds.__dataclass_fields__:
        if getattr(monitor, name, None) is not None:
            values[name] = getattr(monitor, name)
    return Thresholds(**values)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def read_psi(path: Path = Path("/proc/pressure/memory")) -> float | None:
    """`some avg10` of a PSI file: % of the last 10 s some task waited on memory. The same
    format is /proc/pressure/memory (the machine) and a cgroup v2's memory.pressure."""
    text = _read(path)
    for line in (text or "").splitlines():
        if line.startswith("some "):
            fields = dict(kv.split("=", 1) for kv in line.split()[1:])
            return float(fields["avg10"])
    return None


def read_meminfo(root: Path = Path("/proc")) -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out: dict[str, int] = {}
    for line in (_read(root / "meminfo") or "").splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            out[name] = int(parts[0]) * (1024 if parts[-1] == "kB" else 1)
    return out


@dataclass(frozen=True)
class CgroupMemory:
    version: int
    path: Path
    limit: int | None  # None: no limit
    usage: int  # without reclaimable page cache (inactive file pages)


def own_cgroup(proc: Path = Path("/proc/self/cgroup"),
               mount: Path = Path("/sys/fs/cgroup")) -> tuple[int, Path, Path] | None:
    """(version, directory, hierarchy root) of this process's memory cgroup. Inside a
    container the path in /proc/self/cgroup may name the host's hierarchy; the container sees
    its own cgroup as the mount's root then, so fall back to that."""
    text = _read(proc) or ""
    for line in text.splitlines():
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):
            base = mount / "memory"
            own = base / rel.lstrip("/")
            return 1, own if own.is_dir() else base, base
    for line in text.splitlines():
        if line.startswith("0::"):
            own = mount / line[3:].lstrip("/")
            return 2, own if (own / "memory.current").exists() else mount, mount
    return None


def _cgroup_level(version: int, path: Path) -> CgroupMemory | None:
    if version == 2:
        limit_text, usage_text = _read(path / "memory.max"), _read(path / "memory.current")
        stat_key = "inactive_file"
    else:
        limit_text = _read(path / "memory.limit_in_bytes")
        usage_text = _read(path / "memory.usage_in_bytes")
        stat_key = "total_inactive_file"
    if usage_text is None:
        return None
    stat = dict(line.split() for line in (_read(path / "memory.stat") or "").splitlines()
                if len(line.split()) == 2)
    usage = max(0, int(usage_text) - int(stat.get(stat_key, 0)))
    limit = None if limit_text is None or limit_text.strip() == "max" \
        or int(limit_text) >= UNLIMITED else int(limit_text)
    return CgroupMemory(version, path, limit, usage)


def read_cgroup(where: tuple[int, Path, Path] | None) -> CgroupMemory | None:
    """The memory cgroup level with the least headroom, from this process's own cgroup up to
    the root: a systemd service often has no limit of its own but sits in a slice that has
    one (claw-inference.slice), and then the slice's usage against its limit is what counts."""
    if where is None:
        return None
    version, path, root = where
    own = _cgroup_level(version, path)
    if own is None:
        return None
    tightest = own
    level = path
    while True:
        found = _cgroup_level(version, level)
        if found is not None and found.limit is not None and (
                tightest.limit is None
                or found.limit - found.usage < tightest.limit - tightest.usage):
            tightest = found
        if level == root or root not in level.parents:
            break
        level = level.parent
    return tightest


def read_zram(sys_block: Path = Path("/sys/block")) -> int:
    """Bytes of memory the zram devices use for compressed pages (mm_stat field 3)."""
    total = 0
    for dev in sys_block.glob("zram*"):
        fields = (_read(dev / "mm_stat") or "").split()
        if len(fields) >= 3:
            total += int(fields[2])
    return total


@dataclass
class Reading:
    """One sample of every signal; None where the machine does not offer it."""

    psi_some_avg10: float | None = None
    mem_total: int = 0
    mem_available: int = 0
    mem_available_fraction: float = 1.0  # of the smaller of RAM and the cgroup limit
    cgroup_limit: int | None = None
    cgroup_usage: int | None = None
    cgroup_usage_fraction: float | None = None
    swap_used: int = 0
    swap_used_fraction: float | None = None
    zram_used: int = 0
    gpu_memory_used: int | None = None
    gpu_memory_fraction: float | None = None
    injected: list[str] = field(default_factory=list)


def sample(cgroup: tuple[int, Path, Path] | None,
           gpu_memory: Callable[[], tuple[int, int] | None] | None = None,
           inject_file: Path | None = None) -> Reading:
    info = read_meminfo()
    r = Reading(psi_some_avg10=read_psi(), mem_total=info.get("MemTotal", 0),
                mem_available=info.get("MemAvailable", 0), zram_used=read_zram())
    capacity, available = r.mem_total, r.mem_available
    if cgroup is not None and cgroup[0] == 2:  # the container's own stalls count as well
        own = read_psi(cgroup[1] / "memory.pressure")
        if own is not None:
            r.psi_some_avg10 = max(own, r.psi_some_avg10 or 0.0)
    cg = read_cgroup(cgroup)
    if cg is not None:
        r.cgroup_usage, r.cgroup_limit = cg.usage, cg.limit
        if cg.limit:
            r.cgroup_usage_fraction = cg.usage / cg.limit
            capacity = min(capacity, cg.limit) if capacity else cg.limit
            available = min(available, max(0, cg.limit - cg.usage))
    r.mem_available_fraction = available / capacity if capacity else 1.0
    swap_total = info.get("SwapTotal", 0)
    r.swap_used = swap_total - info.get("SwapFree", 0)
    r.swap_used_fraction = r.swap_used / swap_total if swap_total else None
    if gpu_memory is not None:
        try:
            used_total = gpu_memory()
        except Exception as exc:  # a driver hiccup must not stop the monitor
            log.warning("OpenCL memory query failed: %s", exc)
            used_total = None
        if used_total:
            r.gpu_memory_used = used_total[0]
            r.gpu_memory_fraction = used_total[0] / used_total[1] if used_total[1] else None
    if inject_file is not None:
        text = _read(inject_file)
        try:
            data = json.loads(text) if text else {}
        except ValueError:
            data = {}
        for key, value in data.items() if isinstance(data, dict) else ():
            if hasattr(r, key) and key != "injected":
                setattr(r, key, value)
                r.injected.append(key)
    return r


def over(r: Reading, t: Thresholds, scale: float = 1.0) -> list[str]:
    """The signals past `scale` × their threshold (scale < 1 for the calm test)."""
    out = []
    if r.psi_some_avg10 is not None and r.psi_some_avg10 >= t.psi_some_avg10 * scale:
        out.append(f"psi some avg10 {r.psi_some_avg10:.1f} ≥ {t.psi_some_avg10 * scale:.1f}")
    low = t.mem_available_min_fraction / scale if scale else 1.0
    if r.mem_available_fraction <= low:
        out.append(f"available memory {r.mem_available_fraction:.1%} ≤ {low:.1%}")
    for name, value, limit in (
            ("cgroup usage", r.cgroup_usage_fraction, t.cgroup_usage_max_fraction),
            ("swap used", r.swap_used_fraction, t.swap_used_max_fraction),
            ("OpenCL memory", r.gpu_memory_fraction, t.gpu_memory_max_fraction)):
        if value is not None and value >= limit * scale:
            out.append(f"{name} {value:.1%} ≥ {limit * scale:.1%}")
    return out


class PressureMonitor:
    """Samples every `interval_s` on its own thread; `under_pressure` is what the offload
    policy reads. `on_change(pressure, reasons)` is called on every transition."""

    def __init__(self, thresholds: Thresholds, interval_s: float = 1.0,
                 inject_file: Path | None = None,
                 gpu_memory: Callable[[], tuple[int, int] | None] | None = None,
                 on_change: Callable[[bool, list[str]], None] | None = None):
        self.t, self.interval_s, self.inject_file = thresholds, interval_s, inject_file
        self.gpu_memory, self.on_change = gpu_memory, on_change
        self.cgroup = own_cgroup()
        self.reading = Reading()
        self.under_pressure = False
        self.reasons: list[str] = []
        self.transitions = 0
        self._calm_since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def update(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        r = sample(self.cgroup, self.gpu_memory, self.inject_file)
        self.reading = r
        hot = over(r, self.t)
        if not self.under_pressure and hot:
            self._set(True, hot)
        elif self.under_pressure:
            if hot or over(r, self.t, self.t.clear_ratio):
                self._calm_since = None
                self.reasons = hot or self.reasons
            elif self._calm_since is None:
                self._calm_since = now
            if not hot and self._calm_since is not None and now - self._calm_since >= self.t.hold_s:
                self._set(False, [])
        return self.under_pressure

    def _set(self, pressure: bool, reasons: list[str]) -> None:
        self.under_pressure, self.reasons, self._calm_since = pressure, reasons, None
        self.transitions += 1
        log.warning("memory pressure %s%s", "started: " if pressure else "cleared",
                    "; ".join(reasons))
        if self.on_change:
            self.on_change(pressure, reasons)

    def start(self) -> None:
        self.update()
        self._thread = threading.Thread(target=self._run, name="claw-monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.update()
            except Exception:  # keep monitoring whatever one bad sample did
                log.exception("pressure sample failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
