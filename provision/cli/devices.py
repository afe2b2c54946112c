"""`claw devices`: emulated devices on this machine, for demos and tests."""

from __future__ import annotations

from pathlib import Path

import typer

from provision import devices
from provision.output import console, emit

app = typer.Typer(help="Emulated devices (systemd + sshd containers) to provision and test on.",
                  no_args_is_help=True)


@app.command("up")
def up(
    n: int = typer.Argument(1, help="How many devices to start."),
    profile: str = typer.Option("qemu-virt", "--profile", help="Device profile they claim."),
    arch: str = typer.Option("amd64", "--arch", help="amd64 (fast) or arm64 (emulated)."),
    inventory: Path | None = typer.Option(None, "-o", "--inventory",
                                          help="Where to write the inventory."),
) -> None:
    """Start N emulated devices and write an Ansible inventory for them.

    Example: [bold]claw devices up 3 --profile rk3588[/bold], then
    [bold]claw provision -i ~/.local/state/clawforge/devices/inventory.yml[/bold]
    """
    path = devices.devices_up(n, profile, arch, inventory,
                              progress=lambda m: console.print(f"[dim]{m}[/]"))
    console.print(f"inventory: {path}")
    emit("Emulated devices", [d.record() for d in devices.list_devices()],
         {"name": "Device", "address": "Address", "profile": "Profile", "arch": "Arch",
          "status": "Status"}, False)


@app.command("list")
def list_(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the emulated devices.

    Example: [bold]claw devices list --json[/bold]
    """
    emit("Emulated devices", [d.record() for d in devices.list_devices()],
         {"name": "Device", "address": "Address", "profile": "Profile", "arch": "Arch",
          "status": "Status"}, json_out)


@app.command("down")
def down(names: list[str] = typer.Argument(None, help="Devices to remove (default: all).")) -> None:
    """Remove emulated devices (all, or the ones named).

    Example: [bold]claw devices down[/bold]
    """
    removed = devices.devices_down(names or None)
    console.print(f"removed {len(removed)} device(s){': ' + ', '.join(removed) if removed else ''}")
