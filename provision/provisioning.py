"""`claw provision`: apply playbooks/site.yml to an inventory through ansible-runner.

The user's inventory is checked against the profiles first (nothing runs on bad input); each
host's resolved profile values become the roles' variables in a run inventory written beside
the run's artifacts (a variable the user set in the inventory wins over the computed one).
Runner events drive a live per-host display, and a summary is kept with the artifacts so
`claw provision --last` can show it again.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from provision.ansible import HostResult, RunResult, new_run_dir, playbooks_dir, run_playbook
from provision.errors import BadInput, ClawError
from provision.inventory import Host, Inventory, load_inventory
from provision.paths import state_dir

ROLES = ("base", "zram", "hugepages", "cpu_governor", "opencl_drivers", "docker_engine",
         "tuning", "claw_runtime")


def role_vars(host: Host) -> dict[str, Any]:
    """The roles' variables for one host, from its profile and `claw_*` overrides."""
    eff, profile = host.effective(), host.profile
    assert profile is not None
    stack = next(s for s in profile.gpu.opencl if s.name == eff["opencl_stack"])
    model = model_file(host)
    hugepages_mb = eff["hugepages_mb"]
    if hugepages_mb is None:
        hugepages_mb = hugepages_for_model(host, model)
    return {
        "claw_host": eff,
        "zram_fraction_of_ram": eff["zram"]["fraction_of_ram"],
        "zram_algorithm": eff["zram"]["algorithm"],
        "zram_priority": profile.zram.priority,
        **({"zram_max_mb": profile.zram.max_mb} if profile.zram.max_mb else {}),
        "hugepages_page_kb": profile.hugepages.page_kb,
        "hugepages_mb": hugepages_mb,
        "cpu_governor_name": eff["governor"],
        "hugepages_max_fraction_of_ram": profile.hugepages.max_fraction_of_ram,
        "opencl_drivers_stack": stack.name,
        "opencl_drivers_packages": stack.packages,
        "opencl_drivers_icd": stack.icd or "",
        "opencl_drivers_env": stack.env,
        "opencl_drivers_backports": stack.backports,
        "tuning_inference_cpus": eff["runtime"]["cpu_affinity"],
        "tuning_cpus": profile.core_ids,
        "claw_runtime_model_src": str(model or ""),
        "claw_runtime_port": eff["runtime"]["port"],
        "claw_runtime_backend": eff["runtime"]["backend"],
        "claw_runtime_threads": eff["runtime"]["threads"],
        "claw_runtime_cpu_affinity": eff["runtime"]["cpu_affinity"],
        "claw_release_hooks": {**profile.rollout.hooks, **(host.settings.claw_rollout_hooks or {})}
        if host.settings else dict(profile.rollout.hooks),
    }


def model_file(host: Host) -> Path | None:
    """The host's model on the controller (`claw_runtime_model`), checked before anything runs."""
    assert host.settings is not None
    model = host.settings.claw_runtime_model
    if not model:
        return None
    path = Path(model).expanduser().resolve()
    if not path.is_file():
        raise BadInput(f"{host.var_origins.get('claw_runtime_model', host.origin)}: {host.name}: "
                       f"claw_runtime_model: {model} is not a file on this machine (expected "
                       "the GGUF file or model the runtime service serves)")
    return path


def runtime_wheel(inventory: Inventory, tags: list[str] | None) -> dict[str, Any]:
    """The ClawForge wheel for hosts that install the runtime from it, built only when needed."""
    if tags and "claw_runtime" not in tags:
        return {}
    wanted = [h for h in inventory.hosts.values() if h.settings and h.settings.claw_runtime_model
              and (h.settings.claw_runtime_install or "wheel") == "wheel"
              and "claw_runtime_wheel" not in h.vars]
    if not wanted:
        return {}
    from images.wheel import ensure_wheel

    try:
        return {"claw_runtime_wheel": str(ensure_wheel(progress=lambda _: None))}
    except ClawError as exc:
        raise ClawError(f"the runtime service needs the ClawForge wheel: {exc}; or pass one "
                        "with -e claw_runtime_wheel=PATH") from None


def hugepages_for_model(host: Host, model: Path | None) -> int:
    """MB of huge pages for the host's model (`model_file`): its size × the profile's fraction,
    capped by the profile's share of RAM; 0 when no model is named (nothing worth reserving)."""
    assert host.profile is not None
    if model is None:
        return 0
    rule = host.profile.hugepages
    want = model.stat().st_size / 2**20 * rule.fraction_of_model
    cap = host.effective()["ram_gb"] * 1024 * rule.max_fraction_of_ram
    page_mb = rule.page_kb / 1024
    return int(min(want, cap) // page_mb * page_mb)


def run_inventory(inventory: Inventory, path: Path, common: dict[str, Any] | None = None) -> Path:
    """Every host with its merged variables plus the roles' variables, groups kept."""
    groups: dict[str, Any] = {}
    for group, members in inventory.groups.items():
        if group != "all" and members:
            groups[group] = {"hosts": {m: None for m in members}}
    hosts = {name: {**(common or {}), **role_vars(host), **host.vars}
             for name, host in inventory.hosts.items()}
    data = {"all": {"hosts": hosts, "children": groups}}
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")  # JSON is YAML, no anchors
    return path


def check_limit(inventory: Inventory, limit: str | None) -> None:
    """An Ansible --limit naming nothing known is bad input, not an empty run."""
    if not limit:
        return
    names = set(inventory.hosts) | set(inventory.groups)
    for part in limit.replace(";", ",").replace(":", ",").split(","):
        pattern = part.strip().lstrip("!&")
        if pattern and not any(fnmatch.fnmatch(n, pattern) for n in names):
            raise BadInput(f"--limit {part!r} matches no host or group of "
                           f"{inventory.path} (expected one of: {', '.join(sorted(names))})")


def limit_hosts(inventory: Inventory, limit: str | None) -> list[str]:
    """The hosts an Ansible --limit selects, in inventory order: patterns (host or group names,
    shell wildcards) add, `&pattern` intersects, `!pattern` removes."""
    check_limit(inventory, limit)
    if not limit:
        return list(inventory.hosts)

    def matches(pattern: str) -> set[str]:  # a host by its name or any group it is in
        return {name for name, host in inventory.hosts.items()
                if any(fnmatch.fnmatch(n, pattern) for n in (name, "all", *host.groups))}

    parts = [p.strip() for p in limit.replace(";", ",").replace(":", ",").split(",") if p.strip()]
    chosen: set[str] = set()
    for part in (p for p in parts if p[0] not in "!&"):
        chosen |= matches(part)
    for part in (p for p in parts if p[0] == "&"):
        chosen &= matches(part[1:])
    for part in (p for p in parts if p[0] == "!"):
        chosen -= matches(part[1:])
    return [h for h in inventory.hosts if h in chosen]


def check_tags(tags: list[str]) -> None:
    unknown = [t for t in tags if t not in (*ROLES, "always")]
    if unknown:
        raise BadInput(f"--tags {', '.join(unknown)}: unknown (expected role names: "
                       f"{', '.join(ROLES)})")


def parse_extravars(items: list[str]) -> dict[str, Any]:
    """`-e key=value` (value read as YAML) or `-e @file.yml`, as ansible-playbook takes them."""
    out: dict[str, Any] = {}
    for item in items:
        if item.startswith("@"):
            path = Path(item[1:])
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError) as exc:
                raise BadInput(f"-e {item}: cannot read {path} ({exc})") from None
            if not isinstance(data, dict):
                raise BadInput(f"-e {item}: {path} is not a mapping of variables")
            out.update(data)
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise BadInput(f"-e {item!r} is not valid (expected key=value or @file.yml)")
        try:
            out[key] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            out[key] = value
    return out


def summary_records(result: RunResult, inventory: Inventory) -> list[dict[str, Any]]:
    out = []
    for name in inventory.hosts:
        hr = result.hosts.get(name)
        if hr is None:
            continue
        status = "unreachable" if hr.unreachable else "failed" if hr.failed else "ok"
        out.append({"host": name, "status": status, "ok": hr.ok, "changed": hr.changed,
                    "skipped": hr.skipped, "failed_task": hr.failed_task,
                    "message": hr.message, "skipped_live": _skipped_live(hr)})
    return out


def _skipped_live(hr: HostResult) -> list[str]:
    """What the roles said they left for the next boot, and why (their `claw_skipped` notes)."""
    notes: list[str] = []
    for res in hr.results.values():
        facts = res.get("ansible_facts", {}) if isinstance(res, dict) else {}
        for note in facts.get("claw_skipped", []) or []:
            text = (f"{note.get('role')}: {note.get('what')} skipped: {note.get('why')}"
                    if isinstance(note, dict) else str(note))
            if text not in notes:
                notes.append(text)
    return notes


def provision(inventory_path: Path, *, limit: str | None = None, tags: list[str] | None = None,
              check: bool = False, diff: bool = False, extravars: dict[str, Any] | None = None,
              on_event: Callable[[dict[str, Any]], None] | None = None,
              playbook: str = "site.yml") -> tuple[RunResult, list[dict[str, Any]]]:
    inventory = load_inventory(inventory_path, extra_vars=extravars)
    check_limit(inventory, limit)
    check_tags(tags or [])
    if not (playbooks_dir() / playbook).is_file():
        raise ClawError(f"playbook {playbook} is missing from {playbooks_dir()}")
    wheel = runtime_wheel(inventory, tags)
    run_id, private = new_run_dir("provision")
    run_inv = run_inventory(inventory, private / "run-inventory.yml", wheel)
    result = run_playbook(playbook, run_inv, extravars=extravars, limit=limit, tags=tags,
                          check=check, diff=diff, on_event=on_event, run=(run_id, private))
    records = summary_records(result, inventory)
    summary = {"run_id": run_id, "inventory": str(inventory_path), "status": result.status,
               "rc": result.rc, "check": check, "limit": limit, "tags": tags,
               "hosts": records}
    (private / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    (state_dir() / "runs" / "last-provision").write_text(run_id, encoding="utf-8")
    return result, records


def last_summary() -> dict[str, Any]:
    pointer = state_dir() / "runs" / "last-provision"
    if not pointer.exists():
        raise ClawError("no provisioning run yet (run `claw provision -i INVENTORY` first)")
    run_dir = state_dir() / "runs" / pointer.read_text().strip()
    data = json.loads((run_dir / "summary.json").read_text())
    data["artifacts"] = str(run_dir)
    return data
