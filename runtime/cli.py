"""`claw runtime`: inspect, convert and run models on this machine.

Imports numpy and the model code only inside commands, so `claw --help` stays fast and the
controller works without the runtime extra.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

app = typer.Typer(help="Run, inspect and convert quantized LLMs (GGUF or Hugging Face).",
                  no_args_is_help=True)

BACKEND_HELP = "numpy, opencl or auto (OpenCL when present and faster, else numpy)."
BUDGET_HELP = ("Resident memory for the whole process, e.g. 512M or 2G: layers that do not fit "
               "stream from disk (numpy; opencl through a ring of device buffers).")


@app.command("info")
def info(
    model: Path = typer.Argument(..., help="A GGUF file or a Hugging Face model directory."),
    memory_budget: str | None = typer.Option(None, "--memory-budget", help=BUDGET_HELP),
    ctx: int | None = typer.Option(None, "--ctx", min=16, help="Context size (tokens) the "
                                   "KV cache and attention scratch are sized for."),
    backend: str = typer.Option("numpy", "--backend", help="Whose memory plan: numpy, or "
                                "opencl (device ring for streamed layers; loads the model on "
                                "the device)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Architecture, parameters, bytes per tensor type, context length, tokenizer, and the
    memory plan: KV cache, activation and attention scratch bounds, and with --memory-budget
    which layers stay resident or stream and the expected decode speed (from measured disk,
    memory and dequantization rates, cached per machine); with --backend opencl, the ring of
    device buffers streamed layers go through (slots, bytes per slot, host staging).

    Example: [bold]claw runtime info smollm-135m-q8_0.gguf --memory-budget 512M[/bold]
    """
    from provision.errors import BadInput
    from runtime.api import Model

    if backend not in ("numpy", "opencl"):
        raise BadInput(f"--backend {backend!r}: expected numpy or opencl")
    data = Model(model, backend=backend, n_ctx=ctx, memory_budget=memory_budget).info()
    if json_out:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    from rich.table import Table

    from provision.output import console

    table = Table(title=f"{model}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key in ("format", "name", "arch", "parameters", "layers", "dim", "heads", "kv_heads",
                "head_dim", "ffn_dim", "vocab_size", "context_length", "tied_embeddings"):
        value = data[key]
        table.add_row(key, f"{value:,}" if isinstance(value, int) and not isinstance(value, bool)
                      else str(value))
    table.add_row("rope", ", ".join(f"{k} {v}" for k, v in data["rope"].items()))
    for qtype, nbytes in sorted(data["tensor_bytes"].items()):
        table.add_row(f"{qtype} tensors", f"{nbytes / 2**20:,.2f} MiB" + (
            ", products take Q8_0-rounded activations (as llama.cpp)"
            if qtype in data["q8_activation_types"] else ""))
    tok = data["tokenizer"]
    table.add_row("tokenizer", "-" if tok is None else
                  f"{tok['kind']}, {tok['vocab_size']} tokens, bos {tok['bos_id']}, "
                  f"eos {tok['eos_id']}")
    console.print(table)
    _print_plan(data["memory_plan"])


def _print_plan(plan: dict) -> None:
    """The memory plan as a table: bounds first, then the units grouped by tier."""
    from rich.table import Table

    from provision.output import console
    from runtime.memory_plan import mib, unit_ranges

    table = Table(title="memory plan" + (f" for a budget of {mib(plan['budget'])}"
                                         if plan["budget"] else " (no budget: all float32)"),
                  title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("KV cache", f"{mib(plan['kv_cache'])} for {plan['n_ctx']:,} tokens"),
        ("activations", f"≤ {mib(plan['activations'])} for prefill chunks of "
                        f"{plan['prefill_chunk']} tokens"),
        ("attention scratch", f"≤ {mib(plan['attention_scratch'])} (queries in blocks of "
                              f"{plan['attention_rows']})"),
        ("tile scratch", f"{mib(plan['tile_scratch'])} (quantized matmuls)")
        if plan.get("backend") != "opencl" else ("backend", "opencl (GGUF blocks on the device)"),
        ("process baseline", mib(plan["baseline"])),
        ("weights resident", mib(plan["weights_resident"])),
        ("stream slots", mib(plan["stream_slots"])),
        *([("OpenCL ring", f"{ring['slots']} device buffers of {mib(ring['slot_bytes'])} "
            f"({mib(ring['device_bytes'])}; host memory too on a unified-memory device), "
            f"host staging {mib(ring['staging_bytes'])}")] if (ring := plan.get("ring")) else []),
        ("peak", mib(plan["peak"])),
        ("minimum budget", mib(plan["minimum_budget"])),
    ]
    by_tier: dict[str, list[str]] = {}
    for unit in plan["units"]:
        by_tier.setdefault(unit["tier"], []).append(unit["name"])
    rows += [(f"{tier} units", f"{len(names)}: {unit_ranges(names)}")
             for tier, names in by_tier.items()]
    rates, exp = plan["rates"], plan["expected"]
    if rates:
        rows.append(("measured", f"f32 matmul {rates['memory'] / 1e9:.1f} GB/s, disk "
                     f"{rates['disk'] / 1e9:.2f} GB/s, quantized matmul " + ", ".join(
                         f"{q} {v / 1e9:.1f} GB/s" for q, v in rates["dequant"].items())
                     + (" (cached)" if rates["cached"] else "")))
    if exp:
        rows.append(("expected decode", f"{exp['tokens_per_s_serial']:.2f}–"
                     f"{exp['tokens_per_s']:.2f} tok/s (compute {exp['compute_s'] * 1e3:.0f} "
                     f"ms, disk {exp['disk_s'] * 1e3:.0f} ms per token; reads not overlapped "
                     "– fully overlapped)"))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


@app.command("generate")
def generate(
    model: Path = typer.Argument(..., help="A GGUF file or a Hugging Face model directory."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt (or the user message)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the chat template."),
    system: str | None = typer.Option(None, "--system", help="System message (with --chat)."),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", min=1),
    temperature: float = typer.Option(0.8, "--temperature", "-t", min=0.0,
                                      help="0 is greedy."),
    top_k: int = typer.Option(40, "--top-k", min=0),
    top_p: float = typer.Option(0.95, "--top-p", min=0.0, max=1.0),
    min_p: float = typer.Option(0.05, "--min-p", min=0.0, max=1.0),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty", min=0.0),
    seed: int | None = typer.Option(None, "--seed", help="Seed for reproducible sampling."),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
    ctx: int | None = typer.Option(None, "--ctx", min=16, help="Context size (tokens)."),
    memory_budget: str | None = typer.Option(None, "--memory-budget", help=BUDGET_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the result and stats as JSON."),
) -> None:
    """Generate text, streaming it as it is made; speed (and with --memory-budget, the memory
    plan) goes to stderr.

    Example: [bold]claw runtime generate model.gguf -p "Why is the sky blue?" --chat -n 64[/bold]
    """
    from runtime.api import Model
    from runtime.sampling import SamplingParams

    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repeat_penalty, seed=seed,
                            max_tokens=max_tokens, stop=list(stop))
    runtime = Model(model, backend=backend, n_ctx=ctx, memory_budget=memory_budget)
    if memory_budget is not None and not json_out:
        sys.stderr.write(f"[{runtime.plan.summary()}]\n")
    text = prompt
    add_bos = None
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        text = runtime.chat_prompt(messages)
        add_bos = False if runtime.tokenizer.bos_id is not None and \
            text.startswith(runtime.tokenizer.token_text(runtime.tokenizer.bos_id)) else None
    generation = runtime.generate(text, params, add_bos=add_bos)
    for piece in generation:
        if not json_out:
            sys.stdout.write(piece)
            sys.stdout.flush()
    result = generation.result
    stats = result.stats()
    if json_out:
        plan = {"memory_plan": runtime.plan.as_dict()} if memory_budget is not None else {}
        sys.stdout.write(json.dumps({"text": result.text, "token_ids": result.token_ids,
                                     "backend": runtime.backend.name,
                                     "backend_reason": runtime.backend_reason, **stats, **plan},
                                    indent=2) + "\n")
        return
    sys.stdout.write("\n")
    pp = stats["prefill_tokens_per_s"]
    tg = stats["decode_tokens_per_s"]
    if backend == "auto":
        sys.stderr.write(f"[{runtime.backend_reason}]\n")
    sys.stderr.write(f"[{runtime.backend.name}] prompt {stats['prompt_tokens']} tokens"
                     + (f" at {pp:.1f} tok/s" if pp else "")
                     + f", generated {stats['completion_tokens']}"
                     + (f" at {tg:.1f} tok/s" if tg else "")
                     + f", finish: {stats['finish_reason']}\n")


@app.command("convert")
def convert_cmd(
    source: Path = typer.Argument(..., help="A Hugging Face llama/qwen2 model directory."),
    output: Path = typer.Option(..., "-o", "--output", help="The GGUF file to write."),
    qtype: str = typer.Option("f16", "--type", help="f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, "
                              "q5_1, q4_k, q5_k or q6_k (norms and biases stay f32)."),
) -> None:
    """Convert a Hugging Face checkpoint to GGUF (llama.cpp's layout), quantizing its weights.

    Example: [bold]claw runtime convert ./SmolLM-135M -o smollm-q8_0.gguf --type q8_0[/bold]
    """

    from runtime.convert import convert, tokenizer_metadata
    from runtime.errors import ModelError
    from runtime.quant import SUPPORTED

    names = {t.name.lower(): t for t in SUPPORTED}
    if qtype.lower() not in names:
        raise ModelError(f"--type {qtype!r} is not supported (expected one of: "
                         f"{', '.join(sorted(names))})")
    out = convert(source, output, names[qtype.lower()],
                  tokenizer_metadata=tokenizer_metadata(source))
    typer.echo(f"wrote {out} ({out.stat().st_size / 2**20:,.1f} MiB, {qtype.lower()})")


@app.command("bench")
def bench_cmd(
    model: Path | None = typer.Argument(None, help="A GGUF file or a Hugging Face model "
                                        "directory (none with --plot: plot --results)."),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
    n_prompt: int = typer.Option(512, "-p", "--n-prompt", min=1, help="Prompt tokens (pp)."),
    n_gen: int = typer.Option(128, "-n", "--n-gen", min=1, help="Generated tokens (tg)."),
    repeats: int = typer.Option(5, "-r", "--repetitions", min=1),
    memory_budget: str | None = typer.Option(None, "--memory-budget", help=BUDGET_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    plot: Path | None = typer.Option(None, "--plot", help="Also draw the figures as a PNG: "
                                     "this run's, or with no MODEL every table of --results."),
    results: Path | None = typer.Option(None, "--results",
                                        help="Recorded results to plot (bench/RESULTS.md)."),
) -> None:
    """Prefill and decode tokens/s (mean ± sd), peak memory, decode bandwidth against the
    device's measured copy bandwidth, and load time, like llama-bench; with --memory-budget,
    under that budget's plan (and its expected decode speed beside the measured one).

    Example: [bold]claw runtime bench model.gguf --backend opencl -p 512 -n 128 -r 5[/bold];
    [bold]claw runtime bench --plot results.png[/bold] plots bench/RESULTS.md
    """
    from provision.errors import BadInput
    from runtime.bench import bench

    if plot is not None:
        if plot.suffix.lower() != ".png":
            raise BadInput(f"--plot {plot}: expected a .png file name")
        from provision.dashboard.plot import pyplot

        pyplot()  # a missing matplotlib is said now, not after the benchmark
    if model is None:
        if plot is None:
            raise BadInput("MODEL is required (or --plot FILE.png to plot --results)")
        from provision.dashboard import benchdata
        from provision.dashboard.plot import plot_tables

        path = results or benchdata.default_results()
        tables = benchdata.load(path)
        plot_tables(tables, plot, title=str(path))
        typer.echo(f"{plot}: {len(tables)} table(s) from {path}")
        return
    if not model.exists():
        from runtime.errors import ModelError

        raise ModelError(f"{model}: no such model file or directory")
    report = bench(model, backend, n_prompt, n_gen, repeats, memory_budget=memory_budget)
    if plot is not None:
        from provision.dashboard.benchdata import Table
        from provision.dashboard.plot import plot_tables

        table = Table(f"{model.name} on {report['device']}", ["test", "t/s"],
                      [[r["test"], str(r["tps_mean"])] for r in report["rows"]])
        plot_tables([table], plot)
    if json_out:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    from rich.table import Table

    from provision.output import console

    table = Table(title=f"{model} on {report['device']}", title_justify="left")
    for col in ("model", "size_mib", "params_m", "backend", "test", "t/s"):
        table.add_column(col.replace("_mib", " MiB").replace("_m", " M"),
                         justify="right" if col != "model" else "left")
    for row in report["rows"]:
        table.add_row(*(str(row[c]) for c in ("model", "size_mib", "params_m", "backend", "test",
                                              "t/s")))
    console.print(table)
    console.print(f"{report['backend_reason']}")
    console.print(f"peak RSS {report['peak_rss_mib']:,.0f} MiB · decode streams "
                  f"{report['decode_bytes_per_token'] / 2**20:,.0f} MiB/token = "
                  f"{report['decode_bandwidth_gbs']} GB/s, "
                  f"{report['bandwidth_fraction']:.0%} of the device's measured copy bandwidth "
                  f"({report['device_copy_bandwidth_gbs']} GB/s) · load {report['load_s']} s"
                  + (f" warm, {report['cold_load_s']} s cold (compiling)"
                     if "cold_load_s" in report else ""))
    if "memory_plan" in report:
        console.print(report["memory_plan_summary"])


@app.command("tune")
def tune_cmd(
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    repeats: int = typer.Option(3, "-r", "--repetitions", min=1),
) -> None:
    """Time the OpenCL kernels' work-group sizes and tiles on this device and store the
    fastest (used by every later load on this device).

    Example: [bold]claw runtime tune[/bold]
    """
    from dataclasses import asdict

    from runtime.backends.opencl_device import NoDevice, find_device
    from runtime.backends.opencl_programs import ProgramCache
    from runtime.backends.opencl_tuning import default_params, load_params, tune
    from runtime.errors import DeviceError

    try:
        dev = find_device()
    except NoDevice as e:
        raise DeviceError(f"claw runtime tune: {e}") from None
    lines: list[str] = []
    best = tune(dev, ProgramCache(dev), repeats=repeats,
                log=lines.append if json_out else typer.echo)
    _, where = load_params(dev)
    report = {"device": dev.describe(), "params": asdict(best),
              "defaults": asdict(default_params(dev)), "stored": where, "trials": lines}
    if json_out:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    typer.echo(f"{dev.describe()}: " + ", ".join(f"{k}={v}" for k, v in asdict(best).items())
               + f" (stored in {where})")


@app.command("serve")
def serve(
    model: Path | None = typer.Argument(None, help="A GGUF file or a Hugging Face model "
                                        "directory (overrides `model:` in the config)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="The runtime YAML file."),
    host: str | None = typer.Option(None, "--host", help="Address to listen on "
                                    "(default 127.0.0.1, or the config's host)."),
    port: int | None = typer.Option(None, "--port", min=0, max=65535,
                                    help="Port to listen on (default 8080, or the config's port)."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="CLAW_API_KEY",
                                       help="Require this Bearer key on /v1 (also "
                                       "CLAW_API_KEY; overrides api_key_file)."),
    backend: str | None = typer.Option(None, "--backend", help=BACKEND_HELP),
    memory_budget: str | None = typer.Option(None, "--memory-budget", help=BUDGET_HELP +
                                             " Counts one KV cache per scheduler.max_batch."),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions,
    /v1/models, /health, /metrics), offloading non-critical work under memory pressure.

    Example: [bold]claw runtime serve model.gguf --port 8080 --api-key secret[/bold]
    """
    import logging
    import os

    from runtime.server.config import load_config, read_key_file

    cfg = load_config(config, model=str(model) if model else None, host=host, port=port,
                      backend=backend, memory_budget=memory_budget)
    if cfg.model is None:
        from provision.errors import BadInput

        raise BadInput("no model to serve (expected MODEL, or `model:` in the --config file)")
    if cfg.threads:  # read by OpenBLAS/OpenMP when numpy loads, which is below
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(cfg.threads)
    import uvicorn

    from runtime.server.app import create_app
    if cfg.memory_budget is not None:  # the model loads in the background: check the budget now
        from runtime.memory_plan import check_budget

        check_budget(cfg.model, cfg.memory_budget, n_ctx=cfg.context,
                     sequences=cfg.scheduler.max_batch, backend=cfg.backend)
    key = api_key or (read_key_file(cfg.api_key_file, "api_key_file")
                      if cfg.api_key_file else None)
    logging.basicConfig(level=cfg.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(cfg, key), host=cfg.host, port=cfg.port,
                log_level=cfg.log_level, access_log=cfg.log_level == "debug",
                timeout_graceful_shutdown=10)  # open streams must not hold a restart up


@app.command("selftest")
def selftest(
    skip_opencl: bool = typer.Option(False, "--skip-opencl",
                                     help="Check only the model (a machine with no OpenCL)."),
    json_out: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
) -> None:
    """Prove this machine can run models: a tiny generated model generates text on numpy, and
    an OpenCL kernel runs on the first device and matches numpy. Exit 1 when a check fails.

    Example: [bold]claw runtime selftest --json[/bold]
    """
    from runtime.selftest import as_json, run_selftest

    checks = run_selftest(opencl=not skip_opencl)
    report = as_json(checks)
    if json_out:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        for check in checks:
            detail = ", ".join(f"{k} {v!r}" if isinstance(v, str) else f"{k} {v}"
                               for k, v in check.detail.items())
            status = "skip" if check.skipped else "ok  " if check.ok else "FAIL"
            typer.echo(f"{status} {check.name:<7} {check.seconds:6.2f} s  "
                       f"{check.skipped or (detail if check.ok else check.error)}")
    if not report["ok"]:
        failed = [f"{c.name}: {c.error}" for c in checks if not c.ok]
        sys.stderr.write(f"error: self-test failed: {'; '.join(failed)}\n")
        raise typer.Exit(1)


@app.command("quantize")
def quantize_cmd(
    source: Path = typer.Argument(..., help="An F32/F16/BF16 GGUF or a Hugging Face directory."),
    output: Path = typer.Argument(..., help="The GGUF file to write."),
    target_bpw: float | None = typer.Option(None, "--target-bpw", help="Bits per weight of "
                                            "the tensor data, at most (as llama.cpp counts)."),
    max_bytes: int | None = typer.Option(None, "--max-bytes", help="File size, at most."),
    calibration: Path | None = typer.Option(None, "--calibration", help="UTF-8 text the "
                                            "sensitivities are measured on (default: text "
                                            "drawn from the model's vocabulary)."),
    calibration_tokens: int = typer.Option(256, "--calibration-tokens", min=16,
                                           help="Tokens of the calibration text used."),
    no_imatrix: bool = typer.Option(False, "--no-imatrix", help="Fit block scales unweighted "
                                    "(default with --calibration: weight each column by its "
                                    "mean squared activation on that text)."),
    no_gptq: bool = typer.Option(False, "--no-gptq", help="Round each weight to its nearest "
                                 "level (default with --calibration: compensate each rounding's "
                                 "error under the inputs' Gram matrices, GPTQ)."),
    plan_only: bool = typer.Option(False, "--plan-only", help="Print the plan, write nothing."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Quantize each weight matrix to the type its measured sensitivity earns (F16, Q8_0,
    Q6_K, Q5_K, Q4_K or Q4_0) so the model meets a size with the least loss; writes a
    standard GGUF that llama.cpp loads too.

    Example: [bold]claw runtime quantize f16.gguf out.gguf --target-bpw 5 --calibration t.txt[/bold]
    """
    from runtime.mixed_quant import quantize_model

    log = None if json_out else (lambda line: sys.stderr.write(line + "\n"))
    plan = quantize_model(source, None if plan_only else output, target_bpw=target_bpw,
                          max_bytes=max_bytes, calibration=calibration,
                          calibration_tokens=calibration_tokens, imatrix=not no_imatrix,
                          gptq=not no_gptq, progress=log)
    report = plan.as_dict()
    if not plan_only:
        report["output"], report["file_bytes"] = str(output), output.stat().st_size
    if json_out:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    from rich.table import Table

    from provision.output import console

    table = Table(title=f"{source} → {'(plan only)' if plan_only else output}, {plan.limit}",
                  title_justify="left")
    for col in ("tensor", "shape", "type", "bytes", "KL alone", "KL by type"):
        table.add_column(col, justify="left" if col in ("tensor", "KL by type") else "right")
    for t in report["tensors"]:
        table.add_row(t["name"], "×".join(map(str, t["shape"])), t["type"], f"{t['bytes']:,}",
                      f"{t['kl']:.2e}", " ".join(f"{k} {v:.1e}" for k, v in
                                                t["kl_by_type"].items()))
    console.print(table)
    console.print(f"tensor data {plan.tensor_bytes:,} bytes = {plan.bpw:.3f} bits/weight, "
                  f"predicted KL {plan.predicted_kl:.2e} nats/token on "
                  f"{plan.calibration_tokens} calibration tokens; importance matrix: "
                  f"{plan.imatrix or 'none (unweighted scales)'}; levels: "
                  f"{'error-compensated (GPTQ)' if plan.gptq else 'nearest, ' + plan.gptq_note}"
                  + (f"; wrote {report['file_bytes']:,} bytes" if not plan_only else ""))


@app.command("eval")
def eval_cmd(
    model: Path = typer.Argument(..., help="A GGUF file or a Hugging Face model directory."),
    text: Path = typer.Option(..., "--text", help="UTF-8 text to score."),
    base: Path | None = typer.Option(None, "--base", help="The same model at full precision: "
                                     "adds KL divergence and top-token agreement against it."),
    ctx: int | None = typer.Option(None, "--ctx", min=4, help="Window size (default: 512 or "
                                   "the model's context, whichever is smaller)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Perplexity as llama-perplexity computes it (non-overlapping windows of --ctx tokens,
    second half of each scored), and KL divergence against a base model.

    Example: [bold]claw runtime eval mixed.gguf --text wiki.test.txt --base f16.gguf[/bold]
    """
    from runtime.errors import ModelError
    from runtime.perplexity import evaluate

    try:
        content = text.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        raise ModelError(f"--text {text}: no such file (expected a UTF-8 text file)") from None
    except UnicodeDecodeError:
        raise ModelError(f"--text {text}: not UTF-8 text") from None
    result = evaluate(str(model), content, n_ctx=ctx,
                      base_path=str(base) if base is not None else None)
    report = {"model": str(model), "bytes": model.stat().st_size if model.is_file() else None,
              **result.as_dict()}
    if json_out:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    line = (f"{model}: perplexity {result.ppl:.4f} ± {result.ppl_error:.4f} over "
            f"{result.tokens_scored} tokens ({result.windows} windows of {result.n_ctx})")
    if result.kl_mean is not None:
        line += (f"; KL vs {base} mean {result.kl_mean:.5f}, max {result.kl_max:.4f}, "
                 f"same top token {result.top1_agree:.1%}")
    typer.echo(line)
