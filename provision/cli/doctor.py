"""`claw doctor`: check the controller and, with -i, the devices, against known faults."""

from __future__ import annotations

from pathlib import Path

import typer

from provision.doctor import is_broken, run_doctor
from provision.errors import EXIT_FAILED
from provision.output import console, print_json

STYLE = {"error": "red", "warning": "yellow", "info": "cyan"}


def doctor(
    inventory: Path | None = typer.Option(None, "-i", "--inventory",
                                          help="Also check these devices over Ansible."),
    limit: str | None = typer.Option(None, "--limit", help="Only these hosts (Ansible pattern)."),
    show_all: bool = typer.Option(False, "--all", help="List passed checks too."),
    json_out: bool = typer.Option(False, "--json", help="Print every check as JSON."),
) -> None:
    """Check the controller (and devices) against a knowledge base of known faults.

    Exit 1 when a fault of severity [bold]error[/bold] is found.

    Example: [bold]claw doctor[/bold], or [bold]claw doctor -i inventory.yml --json[/bold]
    """
    findings = run_doctor(inventory, limit)
    if json_out:
        print_json([f.record() for f in findings])
    else:
        from rich.table import Table

        table = Table(title="claw doctor", title_justify="left", header_style="bold",
                      show_lines=True)
        table.add_column("Where")
        table.add_column("Check", overflow="fold")
        table.add_column("Status")
        table.add_column("Finding", ratio=1)
        for f in findings:
            if f.status == "ok" and not show_all:
                continue
            fault = f.fault
            if f.status == "fault":
                status = f"[{STYLE[fault.severity]}]{fault.severity.upper()}[/]"
                text = (f"{fault.symptom}\n[bold]cause:[/] {fault.cause}\n[bold]fix:[/] {fault.fix}"
                        + (f"\n[dim]{f.detail}[/]" if f.detail else ""))
            else:
                status = "ok" if f.status == "ok" else "[dim]n/a[/]"
                text = f.detail or fault.symptom
            table.add_row(f.host, fault.id, status, text)
        counts = {s: sum(1 for f in findings if f.status == s) for s in ("fault", "ok", "n/a")}
        console.print(table)
        console.print(f"{len(findings)} checks: {counts['fault']} faults, {counts['ok']} ok, "
                      f"{counts['n/a']} not observed" + ("" if show_all else " (--all lists them)"))
    if is_broken(findings):
        raise typer.Exit(EXIT_FAILED)
