"""`claw fed`: federated fine-tuning: start a run on the fleet, list runs, export one as a GGUF.

(`claw fed run`, which starts a run on the fleet, lives in `provision/cli/fed_run.py`.)
Heavy modules (numpy, the runtime's model code) are imported inside commands.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.markup import escape

from provision.cli.fed_run import run_cmd
from provision.output import console, emit, print_json

app = typer.Typer(help="Federated LoRA fine-tuning with Flower (SecAgg+): run, list, export.",
                  no_args_is_help=True)
app.command("run")(run_cmd)

RUN_COLUMNS = {"id": "Run", "started": "Started", "status": "Status", "rounds": "Rounds",
               "clients": "Clients", "final_eval_loss": "Final eval loss"}


@app.command("export")
def export_cmd(
    run: str = typer.Argument(..., help="A run id (see `claw fed runs`) or a run directory."),
    output: Path = typer.Option(..., "-o", "--output", help="The GGUF file to write."),
    quantize: str | None = typer.Option(None, "--quantize", help="One type for every weight "
                                        "matrix: F32, F16 (default), Q8_0, Q6_K, Q5_K, Q4_K or "
                                        "Q4_0 (norms stay F32)."),
    target_bpw: float | None = typer.Option(None, "--target-bpw", help="Mixed precision: "
                                            "bits per weight of the tensor data, at most, each "
                                            "tensor's type chosen by measured sensitivity."),
    calibration: Path | None = typer.Option(None, "--calibration", help="UTF-8 text the "
                                            "sensitivities are measured on (--target-bpw)."),
    model: Path | None = typer.Option(None, "--model", help="The base GGUF, when it is no "
                                      "longer at the path run.json records (sha256 checked)."),
    allow_unfinished: bool = typer.Option(False, "--allow-unfinished", help="Export a running "
                                          "or failed run's last aggregated adapter."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Merge a run's final LoRA adapter into its base model and write a GGUF.

    The result is a plain GGUF: `claw runtime serve` runs it and llama.cpp loads it.

    Example: [bold]claw fed export fed-20261126-081500-ab12 -o tuned.gguf --quantize Q4_K[/bold]
    """
    from provision.fed.export import export_run

    log = None if json_out else (lambda line: sys.stderr.write(line + "\n"))
    result = export_run(run, output, quantize=quantize, target_bpw=target_bpw,
                        calibration=calibration, model=model, allow_unfinished=allow_unfinished,
                        progress=log)
    if json_out:
        print_json(result.as_dict())
        return
    kinds = ", ".join(f"{n} {t}" for t, n in sorted(result.types.items()))
    console.print(f"wrote {result.output}: {result.file_bytes:,} bytes, "
                  f"{result.bpw:.3f} bits/weight ({kinds}); run {result.run_id}, "
                  f"{len(result.merged)} tensors merged", highlight=False, soft_wrap=True)


@app.command("runs")
def runs_cmd(
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the federated runs recorded on this controller, oldest first (a run whose record
    cannot be read is named on stderr, with why).

    Example: [bold]claw fed runs --json[/bold]
    """
    from provision.fed.runs import list_runs
    from provision.output import err_console

    runs, problems = list_runs()
    for line in problems:
        err_console.print(f"[yellow]warning:[/yellow] {escape(line)}", highlight=False,
                          soft_wrap=True)
    records = [r.as_dict() for r in runs]
    if json_out:
        print_json(records)
        return
    rows = [{**r, "rounds": f"{r['rounds_done']}/{r['rounds']}",
             "clients": len(r["clients"]),
             "final_eval_loss": None if r["final_eval_loss"] is None
             else f"{r['final_eval_loss']:.4f}"} for r in records]
    emit("Federated runs", rows, RUN_COLUMNS, False)
