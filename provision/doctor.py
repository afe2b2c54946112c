"""`claw doctor`: observe the controller (and devices), then match the knowledge base."""

from __future__ import annotations

import json
from pathlib import Path

from provision.ansible import run_playbook
from provision.facts import controller_facts
from provision.inventory import Inventory, load_inventory
from provision.knowledge import SEVERITY_ORDER, Facts, Finding, evaluate, load_faults


def derive_device_facts(facts: Facts, expected_ram_gb: int) -> Facts:
    """Facts that compare what the device reports with what was asked of it."""
    derived = dict(facts)
    derived["expected.ram_gb"] = expected_ram_gb
    if "hugepages.nr" in facts and "hugepages.configured" in facts:
        derived["hugepages.short"] = facts["hugepages.nr"] < facts["hugepages.configured"]
    if "memory.total_gb" in facts:
        # MemTotal excludes firmware/kernel reservations: allow 15 % below the nominal size.
        derived["memory.short_of_inventory"] = facts["memory.total_gb"] < 0.85 * expected_ram_gb
    return derived


def device_facts(inventory: Inventory, limit: str | None = None) -> dict[str, Facts]:
    """Run playbooks/doctor.yml and return each host's facts (or why there are none)."""
    run = run_playbook("doctor.yml", inventory.path, limit=limit, kind="doctor")
    out: dict[str, Facts] = {}
    for name, host in inventory.hosts.items():
        result = run.hosts.get(name)
        if result is None:
            continue  # excluded by --limit
        facts: Facts = {"ansible.unreachable": result.unreachable,
                        "ansible.failed": result.failed and not result.unreachable,
                        "ansible.message": result.message}
        raw = result.results.get("Read device facts", {}).get("stdout", "")
        if raw:
            try:
                facts.update(json.loads(raw))
            except json.JSONDecodeError:
                facts.update({"ansible.failed": True,
                              "ansible.message": f"unreadable facts: {raw[:200]!r}"})
        out[name] = derive_device_facts(facts, host.effective()["ram_gb"])
    return out


def run_doctor(inventory_path: Path | None = None, limit: str | None = None) -> list[Finding]:
    faults = load_faults()
    inventory = load_inventory(inventory_path) if inventory_path else None
    findings = evaluate([f for f in faults if f.scope == "controller"], controller_facts(),
                        "controller")
    if inventory is not None:
        device_faults = [f for f in faults if f.scope == "device"]
        for host, facts in device_facts(inventory, limit).items():
            if facts.get("ansible.unreachable") or facts.get("ansible.failed"):
                # Nothing else about an unreachable device is observed: report only why.
                findings += [f for f in evaluate(device_faults, facts, host)
                             if f.fault.id.startswith("device-")]
            else:
                findings += evaluate(device_faults, facts, host)
    findings.sort(key=lambda f: (f.host != "controller", f.host,
                                 {"fault": 0, "n/a": 1, "ok": 2}[f.status],
                                 SEVERITY_ORDER[f.fault.severity]))
    return findings


def is_broken(findings: list[Finding]) -> bool:
    """Broken means an error-severity fault: warnings and info do not fail the doctor."""
    return any(f.status == "fault" and f.fault.severity == "error" for f in findings)
