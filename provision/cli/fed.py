"""`claw fed`: federated fine-tuning on the fleet (Flower). `run` lives in fed_run.py."""

from __future__ import annotations

import typer

from provision.cli.fed_run import run_cmd

app = typer.Typer(help="Federated LoRA fine-tuning across the fleet with Flower (SecAgg+).",
                  no_args_is_help=True)
app.command("run")(run_cmd)
