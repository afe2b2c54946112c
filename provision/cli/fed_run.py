"""`claw fed run`: federated LoRA fine-tuning across the fleet, one Flower SuperNode a device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from provision.interrupts import sigterm_as_interrupt
from provision.output import console, print_json

ROUND_COLUMNS = {"round": "Round", "clients_joined": "Joined", "clients_dropped": "Dropped",
                 "local_loss": "Local loss", "eval_loss": "Eval loss", "seconds": "Seconds",
                 "bytes_per_client": "Bytes/client"}


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key in ("local_loss", "eval_loss"):
        return f"{float(value):.4f}"
    if key == "seconds":
        return f"{float(value):.1f}"
    if key == "bytes_per_client":
        return f"{int(value):,}"
    return escape(str(value))


def rounds_table(title: str, rounds: list[dict[str, Any]], phase: str = "") -> Table:
    """The per-round table: clients joined/dropped, mean local loss, aggregated eval loss."""
    table = Table(title=title, caption=escape(phase) or None, title_justify="left")
    for key, header in ROUND_COLUMNS.items():
        table.add_column(header, justify="left" if key == "round" else "right")
    for r in rounds:
        style = "yellow" if r.get("clients_dropped") else None
        table.add_row(*(_cell(k, r.get(k)) for k in ROUND_COLUMNS), style=style)
    return table


class LiveRounds:
    """A rich Live table, redrawn as each phase starts and each round's record arrives."""

    def __init__(self, title: str, rounds: int) -> None:
        self.title, self.total = title, rounds
        self.rounds: list[dict[str, Any]] = []
        self.phase = ""
        self.live = Live(self._table(), console=console, refresh_per_second=4, transient=False)

    def _table(self) -> Table:
        return rounds_table(f"{self.title} ({len(self.rounds)}/{self.total} rounds)",
                            self.rounds, self.phase)

    def on_phase(self, phase: str) -> None:
        self.phase = phase
        self.live.update(self._table())

    def on_round(self, record: dict[str, Any]) -> None:
        self.rounds.append(record)
        self.live.update(self._table())


def run_cmd(
    inventory: Path = typer.Option(..., "-i", "--inventory", help="Ansible inventory of the "
                                   "fleet (each device runs one Flower SuperNode)."),
    model: Path = typer.Option(..., "--model", help="The base model (GGUF) on this machine; "
                               "each device must hold the same file (sha256 checked)."),
    data_dir: str = typer.Option(..., "--data-dir", help="Directory of *.txt on each device "
                                 "(its local text; it never leaves the device)."),
    rounds: int = typer.Option(..., "--rounds", help="Federated rounds."),
    min_clients: int | None = typer.Option(None, "--min-clients",
                                           help="Clients a round needs (default: every device)."),
    secagg: bool = typer.Option(True, "--secagg/--no-secagg",
                                help="Secure aggregation (Flower's SecAgg+): the server learns "
                                "only the sum of the updates."),
    server_address: str | None = typer.Option(
        None, "--server-address", help="How the devices reach this machine (default: 127.0.0.1 "
        "for emulated devices, else this machine's address towards the first device)."),
    device_model: str | None = typer.Option(
        None, "--device-model", help="The model's path on the devices (default: "
        "/var/lib/clawforge/models/ and the name of --model)."),
    image: str | None = typer.Option(None, "--image", help="The runtime image with the fed "
                                     "extra on the devices (default: each profile's "
                                     "`claw image build runtime --opencl none --extra fed` tag)."),
    local_steps: int = typer.Option(5, "--local-steps", help="Training steps per client and "
                                    "round."),
    lr: float = typer.Option(5e-4, "--lr", help="Learning rate of the LoRA adapters."),
    json_out: bool = typer.Option(False, "--json", help="Print the run and its rounds as JSON."),
) -> None:
    """Fine-tune LoRA adapters of the model on the devices' own text with Flower: pre-flight
    on every device (refused before any round when one lacks the data or holds another
    model), a SuperLink here, a SuperNode container on each device, a live table per round;
    the clients and the SuperLink are always stopped, the run recorded in the history.

    Example: [bold]claw fed run -i fleet.yml --model chat.gguf --data-dir /srv/fed/text
    --rounds 5 --min-clients 3[/bold]
    """
    from provision.fed.fleet import FedSettings, read_rounds, run_federation

    settings = FedSettings(model=model, data_dir=data_dir, rounds=rounds,
                           min_clients=min_clients, secagg=secagg, server_address=server_address,
                           device_model=device_model, image=image, local_steps=local_steps,
                           lr=lr)
    with sigterm_as_interrupt():
        if json_out:
            run = run_federation(inventory, settings)
        else:
            display = LiveRounds(f"claw fed run {model.name}", rounds)
            with display.live:
                run = run_federation(inventory, settings, on_phase=display.on_phase,
                                     on_round=display.on_round)
    if json_out:
        print_json(run.record() | {"rounds": read_rounds(run.dir / "rounds.jsonl")})
    else:
        console.print(f"federated run {run.id}: {run.status}, {run.rounds_done} rounds; "
                      f"adapter in {run.dir / 'adapter'}", highlight=False)
