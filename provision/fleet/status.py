"""`claw fleet status`: each device's live state (what it runs, its health, its memory) beside
its last rollout from the history."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from provision.ansible import new_run_dir, result_message, run_playbook
from provision.fleet import history
from provision.fleet.rollout import select_hosts
from provision.provisioning import run_inventory


def fleet_status(inventory_path: Path, limit: str | None = None,
                 extravars: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    inventory, hosts = select_hosts(inventory_path, limit, extravars)
    run_id, private = new_run_dir("status")
    run_inv = run_inventory(inventory, private / "run-inventory.yml")
    seen: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}

    def on_event(event: dict[str, Any]) -> None:
        data = event.get("event_data", {})
        host, res = data.get("host"), data.get("res") or {}
        if not host:
            return
        facts = res.get("ansible_facts") or {}
        if event.get("event") == "runner_on_ok" and "claw_release_status" in facts:
            seen[host] = facts["claw_release_status"]
        elif event.get("event") in ("runner_on_failed", "runner_on_unreachable"):
            errors[host] = result_message(res, 200)

    run_playbook("fleet_status.yml", run_inv, extravars=extravars, limit=",".join(hosts),
                 on_event=on_event, run=(run_id, private))
    last = history.last_per_device()
    rows = []
    for host in hosts:
        st = seen.get(host)
        prev = last.get(host, {})
        row: dict[str, Any] = {
            "device": host, "reachable": st is not None, "running": "", "committed": "",
            "previous": "", "pending": "", "model": "", "previous_model": "",
            "pending_model": "", "service": "", "health": "unreachable",
            "mem_available_mb": None, "mem_total_mb": None,
            "last_rollout": prev.get("rollout_id", ""),
            "last_outcome": prev.get("outcome", ""), "error": errors.get(host, ""),
        }
        if st is not None:
            state = st.get("state", {})
            health = st.get("health", {})
            row.update(
                running=st.get("running", {}).get("image", ""),
                service=st.get("running", {}).get("service", ""),
                committed=(state.get("committed") or {}).get("image", ""),
                previous=(state.get("previous") or {}).get("image", ""),
                pending=(state.get("pending") or {}).get("image", ""),
                model=(state.get("committed") or {}).get("model_version", ""),
                previous_model=(state.get("previous") or {}).get("model_version", ""),
                pending_model=(state.get("pending") or {}).get("model_version", ""),
                health="ok" if health.get("http") == 200 else
                (f"http {health['http']}" if health.get("http") else "down"),
                mem_available_mb=st["memory"]["available"] // 2**20,
                mem_total_mb=st["memory"]["total"] // 2**20, error="")
        rows.append(row)
    return rows
