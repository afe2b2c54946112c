"""`claw`: one command line for flashing devices, building images and rolling out the fleet.

Every command group lives in its own module; this one assembles them and is the error
boundary: ClawError becomes one line on stderr and its exit code (1 failed, 2 bad input), and
no Python traceback reaches the user unless CLAW_DEBUG=1.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.markup import escape

from provision import __version__
from provision.cli import (
    devices,
    doctor,
    fed,
    flash,
    fleet,
    image,
    inventory,
    os_image,
    profiles,
    provision,
    vm,
)
from provision.errors import EXIT_BAD_INPUT, EXIT_FAILED, BadInputs, ClawError
from provision.output import err_console
from runtime import cli as runtime_cli
from runtime.errors import ModelError

app = typer.Typer(
    name="claw",
    help="ClawForge: flash ARM devices, build their containers, provision and roll out the fleet.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(profiles.app, name="profiles")
app.add_typer(inventory.app, name="inventory")
app.add_typer(devices.app, name="devices")
app.add_typer(vm.app, name="vm")
app.add_typer(image.app, name="image")
app.command("doctor")(doctor.doctor)
app.command("provision")(provision.provision_cmd)
app.add_typer(fleet.app, name="fleet")
app.add_typer(fed.app, name="fed")
app.add_typer(runtime_cli.app, name="runtime")
app.command("flash")(flash.flash_cmd)
app.command("bmap")(flash.bmap_cmd)
app.add_typer(os_image.app, name="os")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"claw {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """ClawForge: flash ARM devices, build their containers, provision and roll out the fleet.

    Example: [bold]claw doctor[/bold], then [bold]claw profiles list[/bold].
    """


def main() -> None:
    try:
        app()
    except BadInputs as exc:
        for line in exc.problems:
            err_console.print(f"[red]error:[/red] {escape(line)}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except (ClawError, ModelError) as exc:
        code = getattr(exc, "exit_code", EXIT_BAD_INPUT)  # runtime DeviceError: 1
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False,
                          soft_wrap=True)
        sys.exit(code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # the last line of defence: no traceback for users
        if os.environ.get("CLAW_DEBUG"):
            raise
        err_console.print(f"[red]internal error:[/red] {type(exc).__name__}: {escape(str(exc))} "
                          "(run with CLAW_DEBUG=1 for the traceback)", highlight=False,
                          soft_wrap=True)
        sys.exit(EXIT_FAILED)
