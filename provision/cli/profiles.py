"""`claw profiles`: the device profiles ClawForge knows (shipped and the user's own)."""

from __future__ import annotations

import typer

from provision.output import console, emit, print_json
from provision.profiles import ProfileStore

app = typer.Typer(help="Device profiles: list, show and check them.", no_args_is_help=True)


@app.command("list")
def list_profiles(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List every device profile, shipped and user-defined.

    Example: [bold]claw profiles list --json[/bold]
    """
    store = ProfileStore()
    records = [{**store.get(n).summary(), "origin": store.origin(n)} for n in store.names()]
    emit("Device profiles", records,
         {"name": "Profile", "arch": "Arch", "soc": "SoC", "cores": "Cores", "ram_gb": "RAM (GB)",
          "gpu": "GPU", "opencl": "OpenCL stacks", "origin": "Origin"}, json_out)


@app.command("show")
def show(
    name: str = typer.Argument(..., help="Profile name, e.g. rk3588."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show one profile with every value resolved (after `extends:`).

    Example: [bold]claw profiles show rk3588[/bold]
    """
    store = ProfileStore()
    profile = store.get(name)
    data = profile.model_dump(mode="json")
    if json_out:
        print_json(data)
        return
    import yaml

    console.print(f"[bold]{name}[/bold] ({store.origin(name)}: {store.source(name).path})")
    console.print(yaml.safe_dump(data, sort_keys=False).rstrip(), highlight=False)


@app.command("check")
def check() -> None:
    """Validate every profile; print each problem as FILE:LINE.

    Example: [bold]claw profiles check[/bold]
    """
    from provision.errors import BadInputs

    store = ProfileStore()
    problems = store.check_all()
    if problems:
        raise BadInputs(problems)
    console.print(f"{len(store.names())} profiles valid: {', '.join(store.names())}")
