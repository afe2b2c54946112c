"""`claw provision`: run the provisioning playbook with a live per-host display."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import typer
from rich.live import Live
from rich.table import Table

from provision.errors import EXIT_FAILED, BadInput
from provision.output import console, emit, print_json

COLUMNS = {"host": "Host", "status": "Result", "ok": "OK", "changed": "Changed",
           "skipped": "Skipped", "failed_task": "Failed task"}


def render_diff(diff: dict[str, Any]) -> str:
    """One of Ansible's `diff` results (before/after texts, or a prepared text) as a unified
    diff, the way `ansible-playbook --diff` prints it."""
    if "prepared" in diff:
        return str(diff["prepared"])
    before, after = diff.get("before", ""), diff.get("after", "")
    if not isinstance(before, str) or not isinstance(after, str):
        before, after = json.dumps(before, indent=2), json.dumps(after, indent=2)
    return "".join(difflib.unified_diff(
        before.splitlines(keepends=True), after.splitlines(keepends=True),
        fromfile=str(diff.get("before_header", "before")),
        tofile=str(diff.get("after_header", "after"))))


class LiveHosts:
    """Per host: the task it is on and its ok/changed/failed counts, redrawn on each event."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.diffs: list[tuple[str, str, str]] = []  # host, task, unified diff
        self.live = Live(self.table(), console=console, refresh_per_second=8, transient=True)

    def table(self) -> Table:
        table = Table(title="claw provision", title_justify="left", header_style="bold")
        for column in ("Host", "Task", "OK", "Changed", "Failed", "Skipped"):
            table.add_column(column)
        for host, row in sorted(self.rows.items()):
            table.add_row(host, row["task"], str(row["ok"]), str(row["changed"]),
                          str(row["failed"]), str(row["skipped"]))
        return table

    def __call__(self, event: dict[str, Any]) -> None:
        data = event.get("event_data", {})
        host = data.get("host")
        if not host:
            return
        row = self.rows.setdefault(host, {"task": "", "ok": 0, "changed": 0, "failed": 0,
                                          "skipped": 0})
        kind = event.get("event", "")
        res = data.get("res") or {}
        if kind == "runner_on_start":
            row["task"] = data.get("task", "")
        elif kind == "runner_on_ok":
            row["ok"] += 1
            row["changed"] += bool(res.get("changed"))
            diffs = res.get("diff") or []
            for diff in diffs if isinstance(diffs, list) else [diffs]:
                text = render_diff(diff) if isinstance(diff, dict) else ""
                if text.strip() and res.get("changed"):
                    self.diffs.append((host, data.get("task", ""), text))
        elif kind in ("runner_on_failed", "runner_on_unreachable") and not data.get(
                "ignore_errors"):
            row["failed"] += 1
            row["task"] = f"[red]{data.get('task', '')}[/]"
        elif kind == "runner_on_skipped":
            row["skipped"] += 1
        self.live.update(self.table())


def show(summary: dict[str, Any], json_out: bool) -> None:
    if json_out:
        print_json(summary)
        return
    emit(f"provision {summary['run_id']}" + (" (check mode)" if summary.get("check") else ""),
         summary["hosts"], COLUMNS, False)
    for host in summary["hosts"]:
        if host["status"] != "ok":
            console.print(f"[red]{host['host']}: {host['status']} at "
                          f"{host['failed_task']!r}:[/] {host['message']}", highlight=False)
        for note in host.get("skipped_live", []):
            console.print(f"[dim]{host['host']}: {note}[/]", highlight=False)
    if summary.get("artifacts"):
        console.print(f"[dim]artifacts: {summary['artifacts']}[/]")


def provision_cmd(
    inventory: Path | None = typer.Option(None, "-i", "--inventory", help="Ansible inventory."),
    limit: str | None = typer.Option(None, "--limit", help="Only these hosts/groups."),
    tags: str | None = typer.Option(None, "--tags", help="Only these roles (comma-separated)."),
    check: bool = typer.Option(False, "--check", help="Report what would change; change nothing."),
    diff: bool = typer.Option(False, "--diff", help="Show the changes made to files."),
    extra: list[str] = typer.Option([], "-e", "--extra-vars", help="key=value or @file.yml."),
    last: bool = typer.Option(False, "--last", help="Show the last run's summary."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Provision devices: zram, hugepages, CPU governor, OpenCL, Docker, tuning.

    Exit 1 when a host failed or was unreachable; the others still finish.

    Example: [bold]claw provision -i fleet.yml --limit boards --tags zram,tuning --check[/bold]
    """
    from provision.provisioning import last_summary, parse_extravars, provision

    if last:
        show(last_summary(), json_out)
        return
    if inventory is None:
        raise BadInput("-i INVENTORY is required (or --last to show the last run)")
    display = LiveHosts()
    tag_list = [t.strip() for t in tags.split(",") if t.strip()] if tags else None
    extravars = parse_extravars(extra)
    if json_out:
        result, records = provision(inventory, limit=limit, tags=tag_list, check=check, diff=diff,
                                    extravars=extravars)
    else:
        with display.live:
            result, records = provision(inventory, limit=limit, tags=tag_list, check=check,
                                        diff=diff, extravars=extravars, on_event=display)
    summary = last_summary()
    if diff and not json_out:
        for host, task, text in display.diffs:
            console.print(f"[bold]{host}: {task}[/]")
            console.print(text, highlight=False, markup=False)
    show(summary, json_out)
    if result.rc != 0 or any(r["status"] != "ok" for r in records):
        raise typer.Exit(EXIT_FAILED)
