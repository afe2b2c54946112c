"""`claw fleet`: roll runtime images out across the fleet, roll them back, and see where it is."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.live import Live
from rich.table import Table

from provision.errors import EXIT_FAILED, BadInput, ClawError
from provision.interrupts import sigterm_as_interrupt
from provision.output import console, emit, print_json

app = typer.Typer(help="Roll out runtime images across the fleet: canary, batches, health "
                  "checks, rollback, history.", no_args_is_help=True)

INVENTORY_HELP = "Ansible inventory of the fleet."
DEVICE_COLUMNS = {"device": "Device", "batch": "Batch", "from_image": "From", "to_image": "To",
                  "phase": "Phase", "outcome": "Outcome", "delivery": "Delivery",
                  "seconds": "Seconds"}
STATUS_COLUMNS = {"device": "Device", "running": "Running", "model": "Model", "health": "Health",
                  "service": "Service", "pending": "Pending", "previous": "Previous",
                  "mem_available_mb": "Mem avail MB", "mem_total_mb": "Mem total MB",
                  "last_rollout": "Last rollout", "last_outcome": "Outcome"}
HISTORY_COLUMNS = {"id": "Rollout", "kind": "Kind", "when": "Started", "user": "By",
                   "image": "Release", "status": "Status", "devices": "Devices",
                   "seconds": "Seconds", "stopped_at": "Stopped at", "error": "Error"}
STYLE = {"ok": "green", "current": "green", "rolled_back": "yellow", "failed": "red",
         "unreachable": "red", "skipped": "dim", "pending": ""}


def _seconds(row: dict[str, Any]) -> str:
    if row.get("started") and row.get("ended"):
        return f"{row['ended'] - row['started']:.1f}"
    return ""


def _device_rows(devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**d, "seconds": _seconds(d)} for d in devices]


class LiveRollout:
    """Per device: batch, phase and outcome, redrawn as the history changes."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.live = Live(Table(), console=console, refresh_per_second=4, transient=True)

    def __call__(self, devices: dict[str, dict[str, Any]]) -> None:
        table = Table(title=self.title, title_justify="left", header_style="bold")
        for column in ("Device", "Batch", "Phase", "Outcome"):
            table.add_column(column)
        for name, row in sorted(devices.items()):
            outcome = row.get("outcome", "pending")
            style = STYLE.get(outcome, "")
            table.add_row(name, str(row.get("batch", "")), row.get("phase", ""),
                          f"[{style}]{outcome}[/]" if style else outcome)
        self.live.update(table)


def _show_devices(title: str, devices: list[dict[str, Any]]) -> None:
    """The per-device table, then what went wrong on each device that did not take it."""
    emit(title, _device_rows(devices), DEVICE_COLUMNS, False)
    for d in devices:
        if d["error"]:
            style = "red" if d["outcome"] in ("failed", "unreachable") else "yellow"
            console.print(f"[{style}]{d['device']}: {d['outcome']}:[/] {d['error']}",
                          highlight=False)


def _show_result(result: Any, json_out: bool) -> None:
    if json_out:
        print_json(result.__dict__)
    else:
        _show_devices(f"{result.rollout_id}: {result.status}", result.devices)
        if result.error:
            console.print(f"[red]{result.error}[/]", highlight=False)
        console.print(f"[dim]artifacts: {result.artifacts}[/]")
    if result.status != "succeeded":
        raise typer.Exit(EXIT_FAILED)


@app.command("rollout")
def rollout_cmd(
    inventory: Path = typer.Option(..., "-i", "--inventory", help=INVENTORY_HELP),
    image: str | None = typer.Option(None, "--image", help="The runtime image tag to release."),
    model: Path | None = typer.Option(None, "--model", help="Or a GGUF model to release, "
                                      "served by the image each device runs."),
    canary: int = typer.Option(1, "--canary", help="Devices in the first batch (0: none)."),
    batch: str = typer.Option("25%", "--batch", help="Later batches: devices or % of all."),
    max_fail: str = typer.Option("10%", "--max-fail",
                                 help="Stop when more than this % of a batch fails."),
    strategy: str = typer.Option("download-then-restart", "--strategy",
                                 help="download-then-restart or restart-then-download."),
    registry: str | None = typer.Option(None, "--registry",
                                        help="host:port to deliver through (default: tarball)."),
    health_timeout: int = typer.Option(180, "--health-timeout",
                                       help="Seconds the new version has to prove healthy."),
    limit: str | None = typer.Option(None, "--limit", help="Only these hosts/groups."),
    resume: str | None = typer.Option(None, "--resume",
                                      help="Finish an interrupted or halted rollout (its id)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the batches; change nothing."),
    extra: list[str] = typer.Option([], "-e", "--extra-vars", help="key=value or @file.yml."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Release a runtime image (or a model for it): a canary, then batches; each device
    health-checked (/health and one completion) and rolled back on failure; stop past the
    failure budget.

    Exit 1 unless every device ends on the new version.

    Example: [bold]claw fleet rollout -i fleet.yml --image clawforge/runtime:0.2.0-rk3588-arm64
    --canary 1 --batch 25% --max-fail 10%[/bold]
    """
    from provision.fleet import history
    from provision.fleet.plan import Settings, parse_batch, parse_max_fail
    from provision.fleet.rollout import rollout
    from provision.provisioning import parse_extravars

    if resume and not image and not model:
        saved = history.get(resume)
        if saved["settings"].get("model"):
            model = Path(saved["settings"]["model"])
        else:
            image = saved["image"]
    if not image and not model:
        raise BadInput("--image TAG or --model FILE.gguf is required (or --resume ROLLOUT)")
    settings = Settings(canary=canary, batch=parse_batch(batch), max_fail=parse_max_fail(max_fail),
                        strategy=strategy, registry=registry or "",
                        health_timeout=health_timeout)
    if resume:
        saved = history.get(resume)["settings"]
        settings = Settings(**{k: saved[k] for k in Settings.__dataclass_fields__ if k in saved})
    if registry is not None and not registry.strip():
        raise BadInput("--registry '' is not valid (expected host:port)")
    extravars = parse_extravars(extra)
    if dry_run:
        batches = rollout(inventory, image, settings, limit=limit, extravars=extravars,
                          dry_run=True, resume=resume, model=model)
        plan = [{"batch": i, "devices": b} for i, b in enumerate(batches)]
        if json_out:
            print_json({"image": image, "model": str(model or ""), "settings": settings.__dict__,
                        "batches": plan})
        else:
            console.print(f"dry run: {image or model}, {settings.delivery} delivery, "
                          f"{settings.strategy}, stop past {settings.max_fail}% failed in a "
                          "batch; nothing is changed", highlight=False)
            emit("Batches", plan, {"batch": "Batch", "devices": "Devices"}, False)
        return
    display = LiveRollout(f"claw fleet rollout {image or model}")
    note = (lambda m: None) if json_out else (lambda m: console.print(f"[dim]{m}[/]"))
    with sigterm_as_interrupt():  # recorded as interrupted, resumable
        if json_out:
            result = rollout(inventory, image, settings, limit=limit, extravars=extravars,
                             resume=resume, model=model)
        else:
            with display.live:
                result = rollout(inventory, image, settings, limit=limit, extravars=extravars,
                                 resume=resume, progress=note, on_change=display,
                                 model=model)
    _show_result(result, json_out)


@app.command("rollback")
def rollback_cmd(
    inventory: Path = typer.Option(..., "-i", "--inventory", help=INVENTORY_HELP),
    to: str | None = typer.Option(None, "--to", help="Image (or model version, name@sha256 "
                                  "prefix) every device goes to (it must still be on the "
                                  "devices; default: each one's previous)."),
    rollout_id: str | None = typer.Option(None, "--rollout", help="Undo this rollout: its "
                                          "devices back to what they ran before it."),
    limit: str | None = typer.Option(None, "--limit", help="Only these hosts/groups."),
    extra: list[str] = typer.Option([], "-e", "--extra-vars", help="key=value or @file.yml."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Put devices back on an earlier version, health-checked.

    Example: [bold]claw fleet rollback -i fleet.yml --to clawforge/runtime:0.1.0-rk3588-arm64[/bold]
    """
    from provision.fleet.rollout import rollback
    from provision.provisioning import parse_extravars

    display = LiveRollout("claw fleet rollback")
    extravars = parse_extravars(extra)
    with sigterm_as_interrupt():
        if json_out:
            result = rollback(inventory, to=to, rollout_id=rollout_id, limit=limit,
                              extravars=extravars)
        else:
            with display.live:
                result = rollback(inventory, to=to, rollout_id=rollout_id, limit=limit,
                                  extravars=extravars, on_change=display)
    _show_result(result, json_out)


@app.command("status")
def status_cmd(
    inventory: Path = typer.Option(..., "-i", "--inventory", help=INVENTORY_HELP),
    limit: str | None = typer.Option(None, "--limit", help="Only these hosts/groups."),
    extra: list[str] = typer.Option([], "-e", "--extra-vars", help="key=value or @file.yml."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Each device now: the version it runs, its health, memory and last rollout.

    Exit 1 when a device is unreachable or unhealthy.

    Example: [bold]claw fleet status -i fleet.yml --json[/bold]
    """
    from provision.fleet.status import fleet_status
    from provision.provisioning import parse_extravars

    rows = fleet_status(inventory, limit=limit, extravars=parse_extravars(extra))
    emit("Fleet status", rows, STATUS_COLUMNS, json_out)
    bad = [r for r in rows if r["health"] != "ok"]
    if not json_out:
        for row in bad:
            console.print(f"[red]{row['device']}: {row['health']}[/] {row['error']}",
                          highlight=False)
    if bad:
        raise typer.Exit(EXIT_FAILED)


@app.command("history")
def history_cmd(
    rollout_id: str | None = typer.Argument(None, help="One rollout, device by device."),
    last: int = typer.Option(20, "--last", help="How many rollouts to list."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Every rollout and rollback: who, when, what, and how each device ended.

    Example: [bold]claw fleet history[/bold], then [bold]claw fleet history ROLLOUT_ID[/bold]
    """
    from provision.fleet import history

    if last < 1:
        raise BadInput(f"--last {last} is not valid (expected 1 or more)")
    if rollout_id:
        row = history.get(rollout_id)
        if json_out:
            print_json(row)
            return
        _show_devices(f"{row['id']} ({row['kind']} of {row['image']}, by {row['user']}): "
                      f"{row['status']}", row["devices"])
        for text in (row["stopped_at"] and f"stopped at {row['stopped_at']}", row["error"],
                     row["notes"]):
            if text:
                console.print(text, highlight=False)
        return
    rows = history.rollouts(limit=last)
    if json_out:
        print_json(rows)
        return
    out = []
    for row in rows:
        counts: dict[str, int] = {}
        for d in row["devices"]:
            counts[d["outcome"]] = counts.get(d["outcome"], 0) + 1
        out.append({**row, "when": time.strftime("%Y-%m-%d %H:%M:%S",
                                                  time.localtime(row["started"])),
                    "devices": " ".join(f"{k}={v}" for k, v in sorted(counts.items())),
                    "seconds": _seconds(row)})
    emit("Rollout history", out, HISTORY_COLUMNS, False)


@app.command("dashboard")
def dashboard_cmd(
    inventory: Path = typer.Option(..., "-i", "--inventory", help=INVENTORY_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8765, "--port", min=1, max=65535, help="Port to listen on."),
    token: str | None = typer.Option(None, "--token", envvar="CLAW_DASHBOARD_TOKEN",
                                     help="Token for actions (and pages, off loopback); "
                                     "default on loopback: a fresh one, printed."),
    sample: float = typer.Option(5.0, "--sample", min=0.0,
                                 help="Seconds between samples of each runtime's /metrics "
                                 "(0: none)."),
    session_hours: float = typer.Option(12.0, "--session-hours", min=0.01,
                                        help="How long a login lasts."),
    results: Path | None = typer.Option(None, "--results",
                                        help="bench/RESULTS.md for the benchmark page."),
) -> None:
    """A web page for the fleet: devices, live rollouts, runtime charts, benchmark plots, and
    rollout, rollback and re-provision actions (with the token).

    Off loopback a --token is required, and every page asks for it.

    Example: [bold]claw fleet dashboard -i fleet.yml --port 8765[/bold], then open the
    printed link
    """
    import uvicorn

    from provision.dashboard.app import Config, create_app
    from provision.dashboard.auth import Auth, check_bind, is_loopback
    from provision.inventory import load_inventory

    the_token = check_bind(host, token)
    inv = load_inventory(inventory)
    cfg = Config(inventory=inv, auth=Auth(the_token, session_hours * 3600, is_loopback(host)),
                 sample_interval=sample, results=results)
    shown = host if ":" not in host else f"[{host}]"
    link = f"http://{shown}:{port}/login?token={the_token}" if token is None else \
        f"http://{shown}:{port}/ (token: the one given)"
    console.print(f"dashboard for {inventory} ({len(inv.hosts)} devices): {link}",
                  highlight=False, soft_wrap=True)
    try:
        uvicorn.run(create_app(cfg), host=host, port=port, log_level="warning")
    except SystemExit as exc:  # uvicorn exits when it cannot bind
        raise ClawError(f"--host {host} --port {port}: cannot listen there (in use?)") from exc
