"""`claw inventory`: validate an Ansible inventory against the device profiles."""

from __future__ import annotations

from pathlib import Path

import typer

from provision.inventory import load_inventory
from provision.output import emit

app = typer.Typer(help="Ansible inventories: check them before anything runs.",
                  no_args_is_help=True)


@app.command("check")
def check(
    file: Path = typer.Argument(..., help="Ansible YAML inventory."),
    json_out: bool = typer.Option(False, "--json", help="Print the resolved hosts as JSON."),
) -> None:
    """Check every host's profile and overrides; print the resolved hosts.

    Problems are printed as [bold]FILE:LINE: field: what is wrong (expected …)[/bold], exit 2.

    Example: [bold]claw inventory check examples/fleet.yml[/bold]
    """
    inventory = load_inventory(file)
    records = [h.effective() for h in inventory.hosts.values()]
    emit(f"{file}: {len(records)} hosts valid", records,
         {"host": "Host", "profile": "Profile", "address": "Address", "port": "Port",
          "ram_gb": "RAM (GB)", "opencl_stack": "OpenCL", "groups": "Groups"}, json_out)
