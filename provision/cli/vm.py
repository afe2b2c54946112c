"""`claw vm`: the QEMU arm64 VM, a real arm64 kernel to provision and boot-test on."""

from __future__ import annotations

import shlex
import time

import typer

from provision import vm as vms
from provision.errors import BadInput
from provision.output import console, emit

app = typer.Typer(help="The QEMU arm64 VM (a real Debian arm64 kernel under TCG, SSH on a "
                       "loopback port) to provision and test on.", no_args_is_help=True)

COLUMNS = {"name": "VM", "address": "Address", "status": "Status", "memory_mb": "Memory (MB)",
           "cpus": "CPUs", "console_log": "Console log"}


def _progress(message: str) -> None:
    console.print(f"[dim]{message}[/]")


@app.command("up")
def up(
    port: int | None = typer.Option(None, "--port", help="Loopback port for SSH (default: the "
                                                         f"first free one from {vms.FIRST_PORT})."),
    memory: int = typer.Option(2048, "--memory", help="Guest memory in MB."),
    cpus: int = typer.Option(2, "--cpus", help="Guest CPUs (each one is a TCG thread here)."),
    name: str | None = typer.Option(None, "--name", help="VM name (default: claw-vm-N)."),
) -> None:
    """Build the VM image if needed (cached by its inputs), boot a VM and wait for SSH.

    Example: [bold]claw vm up[/bold], then
    [bold]claw provision -i ~/.local/state/clawforge/vm/inventory.yml[/bold]
    """
    started = time.monotonic()
    image = vms.ensure_vm_image(progress=_progress)
    built = time.monotonic()
    vm = vms.start_vm(image, port=port, memory_mb=memory, cpus=cpus, name=name,
                      progress=_progress)
    console.print(f"{vm.name} is up on 127.0.0.1:{vm.port} (image {built - started:.0f} s, "
                  f"boot to SSH {time.monotonic() - built:.0f} s)")
    console.print(f"inventory: {vms.inventory_path()}")
    console.print(f"ssh: {shlex.join(vm.ssh_command())}", soft_wrap=True)


@app.command("list")
def list_(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the VMs and whether their QEMU still runs.

    Example: [bold]claw vm list --json[/bold]
    """
    emit("QEMU arm64 VMs", [v.record() for v in vms.list_vms()], COLUMNS, json_out)


@app.command("down")
def down(names: list[str] = typer.Argument(None, help="VMs to stop (default: all).")) -> None:
    """Power the VMs off (all, or the ones named) and drop their disk overlays.

    Example: [bold]claw vm down[/bold]
    """
    stopped = vms.stop_vms(names or None)
    console.print(f"stopped {len(stopped)} VM(s){': ' + ', '.join(stopped) if stopped else ''}")


@app.command("console")
def console_(
    name: str | None = typer.Argument(None, help="The VM (default: the only one)."),
    lines: int = typer.Option(40, "-n", "--lines", help="How many lines from the end."),
    follow: bool = typer.Option(False, "-f", "--follow", help="Keep printing new output."),
) -> None:
    """Show the end of a VM's serial console log (boot messages, kernel errors).

    Example: [bold]claw vm console claw-vm-1 -n 100[/bold]
    """
    if name is None:
        known = vms.list_vms()
        if len(known) != 1:
            raise BadInput(f"name the VM (known: {', '.join(v.name for v in known) or 'none'})")
        vm = known[0]
    else:
        vm = vms.get_vm(name)
    typer.echo(vm.console_tail(lines))
    if not follow:
        return
    with open(vm.console_log, "rb") as log:
        log.seek(0, 2)
        try:
            while True:
                chunk = log.read()
                if chunk:
                    typer.echo(chunk.decode("utf-8", errors="replace").replace("\r", ""), nl=False)
                elif not vm.running():
                    break
                else:
                    time.sleep(0.5)
        except KeyboardInterrupt:
            pass
