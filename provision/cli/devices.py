"""`claw devices`: emulated devices on this machine, for demos and tests."""

from __future__ import annotations

from pathlib import Path

import typer

from provision import devices
from provision.output import console, emit

FLEET_HELP = "A name for a group of emulated devices (tests use their own)."
COLUMNS = {"name": "Device", "fleet": "Fleet", "address": "Address", "profile": "Profile",
           "arch": "Arch", "engine": "Engine", "status": "Status"}

app = typer.Typer(help="Emulated devices (systemd + sshd containers) to provision and test on.",
                  no_args_is_help=True)


@app.command("up")
def up(
    n: int = typer.Argument(1, help="How many devices the fleet should have."),
    profile: str = typer.Option("qemu-virt", "--profile", help="Device profile they claim."),
    arch: str = typer.Option("amd64", "--arch", help="amd64 (fast) or arm64 (emulated)."),
    inventory: Path | None = typer.Option(None, "-o", "--inventory",
                                          help="Where to write the inventory."),
    fleet: str = typer.Option(devices.DEFAULT_FLEET, "--fleet", help=FLEET_HELP),
    engine: bool = typer.Option(False, "--engine", help=(
        "Give each device its own Docker engine (Debian's docker.io, configured and started "
        "by `claw provision --tags docker_engine`; its /var/lib/docker on a volume, overlay2), "
        "for image rollouts.")),
) -> None:
    """Make the fleet have N emulated devices (starting the missing ones) and write an
    Ansible inventory for them.

    Example: [bold]claw devices up 3 --profile rk3588[/bold], then
    [bold]claw provision -i ~/.local/state/clawforge/devices/dev-inventory.yml[/bold]
    """
    path = devices.devices_up(n, profile, arch, inventory,
                              progress=lambda m: console.print(f"[dim]{m}[/]"), fleet=fleet,
                              engine=engine)
    console.print(f"inventory: {path}")
    emit("Emulated devices", [d.record() for d in devices.list_devices(fleet)], COLUMNS, False)


@app.command("list")
def list_(
    fleet: str | None = typer.Option(None, "--fleet", help="Only this fleet."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the emulated devices (every fleet unless --fleet).

    Example: [bold]claw devices list --json[/bold]
    """
    emit("Emulated devices", [d.record() for d in devices.list_devices(fleet)], COLUMNS,
         json_out)


@app.command("down")
def down(
    names: list[str] = typer.Argument(None, help="Devices to remove (default: all)."),
    fleet: str = typer.Option(devices.DEFAULT_FLEET, "--fleet", help=FLEET_HELP),
) -> None:
    """Remove a fleet's emulated devices (all, or the ones named), with the volumes of their
    Docker engines.

    Example: [bold]claw devices down[/bold]
    """
    removed = devices.devices_down(names or None, fleet)
    console.print(f"removed {len(removed)} device(s){': ' + ', '.join(removed) if removed else ''}")
