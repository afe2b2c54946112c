"""The runner's events folded into a rollout's history as they arrive: each device's batch,
phase (the claw_release role reports each step as the fact claw_release_event), versions,
delivery, timings and outcome."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from provision.ansible import result_message
from provision.fleet import history

FAIL_TASK = "Fail the device, saying what happened"  # the deploy's last word on a device


class Tracker:
    """Folds the runner's events into the history as they arrive (and keeps them for the
    caller): each device's batch, phase, versions, delivery, timings and outcome."""

    def __init__(self, rollout_id: str, on_change: Callable[[dict[str, dict[str, Any]]], None]
                 | None = None, batch_offset: int = 0):
        self.rollout_id = rollout_id
        self.on_change = on_change
        self.batch = batch_offset - 1
        self.devices: dict[str, dict[str, Any]] = {}
        self.halted = False

    def _update(self, host: str, **fields: Any) -> None:
        row = self.devices.setdefault(host, {"device": host})
        row.update(fields)
        history.device_update(self.rollout_id, host, **fields)
        if self.on_change:
            self.on_change(self.devices)

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event", "")
        data = event.get("event_data", {})
        host = data.get("host")
        if kind == "playbook_on_play_start":
            self.batch += 1
        elif kind == "playbook_on_no_hosts_remaining":
            self.halted = True
        if not host:
            return
        res = data.get("res") or {}
        if kind == "runner_on_ok":
            step = (res.get("ansible_facts") or {}).get("claw_release_event")
            if isinstance(step, dict):
                self._phase(host, step)
        elif kind == "runner_on_failed" and not data.get("ignore_errors"):
            message = result_message(res)
            if data.get("task") == FAIL_TASK:
                row = self.devices.get(host, {})
                healthy = row.get("phase") == "rolled_back" and row.get("rollback_healthy")
                self._update(host, outcome="rolled_back" if healthy else "failed",
                             error=message, ended=time.time())
            else:
                self.devices.setdefault(host, {"device": host})["last_error"] = \
                    f"{data.get('task', '')}: {message}"
        elif kind == "runner_on_unreachable":
            message = result_message(res, 300)
            self._update(host, outcome="unreachable", error=message, ended=time.time())

    def _phase(self, host: str, step: dict[str, Any]) -> None:
        phase = step.get("phase", "")
        fields: dict[str, Any] = {"phase": phase}
        if phase == "started":
            fields.update(batch=self.batch, from_image=step.get("from", ""), started=time.time(),
                          outcome="pending", error="")
        elif phase == "delivered":
            fields["delivery"] = step.get("delivery", "")
        elif phase == "committed":
            fields.update(outcome="ok", ended=time.time())
        elif phase == "current":
            fields.update(outcome="current", ended=time.time())
        elif phase == "rolled_back":
            row = self.devices.setdefault(host, {"device": host})
            row["rollback_healthy"] = str(step.get("healthy")).lower() == "true"
            row["to"] = step.get("to", "")
        self._update(host, **fields)

    def finish_stats(self, stats: dict[str, Any]) -> None:
        """Devices the playbook failed outside the release block (e.g. no runtime unit)."""
        for host in (stats.get("failures") or {}):
            row = self.devices.get(host, {})
            if row.get("outcome") in (None, "pending"):
                self._update(host, outcome="failed", ended=time.time(),
                             error=row.get("last_error", "failed"))
