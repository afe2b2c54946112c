"""Federated LoRA rounds on the real Flower engine: time per round and bytes each client sends
per round, with and without SecAgg+, for 3 and 10 clients (SuperNode processes on this machine).

Model: the trained tiny Llama (tests/trained_model.py, 2 layers, r=8 adapter on q/k/v/o:
16 arrays, 28 672 weights). Each client trains `--steps` AdamW steps per round on its own
shard. A round's seconds and bytes come from the ServerApp's own rounds.jsonl (bytes: the
payload of every reply a client sent in that round, counted by the server: plain FedAvg is
one train + one evaluate reply; SecAgg+ adds its key-exchange and unmask stages). The peer
is plain FedAvg at the same client count, measured in the same run: the SecAgg+/plain ratio
is what secure aggregation costs. min-clients is 2, so a client that fails under load is
counted out (`joined`) rather than failing the run. Every ClientApp message starts a fresh
`flwr-clientapp` process (Flower's subprocess isolation), so a round's time is dominated by
process starts and imports on a machine with few cores.

    .venv/bin/python bench/bench_fed.py [--clients 3,10] [--rounds 2] [--steps 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import print_report  # noqa: E402


def measure(clients: int, secagg: bool, rounds: int, steps: int, tiny: Any) -> dict[str, Any]:
    from runtime.fed import federation as fed
    from runtime.fed.model import file_sha256
    from runtime.fed.settings import RunSettings
    from tests import trained_model as tm

    text = "\n\n".join((tm.LICENSES / f).read_text() for f in tm.TRAIN_FILES)
    paras = text.split("\n\n")
    with tempfile.TemporaryDirectory(prefix="claw-bench-fed-") as tmp:
        work = Path(tmp)
        link = fed.start_superlink(work)
        nodes = []
        try:
            for i in range(clients):
                d = work / f"data{i}"
                d.mkdir()
                (d / "local.txt").write_text("\n\n".join(paras[i::clients]))
                nodes.append(fed.start_supernode(link.address, model=tiny.f32, data_dir=d,
                                                 workdir=work, name=f"dev{i}"))
            settings = RunSettings(num_rounds=rounds, local_steps=steps, min_clients=2,
                                   secagg=secagg, run_dir=str(work / "run"),
                                   model_sha256=file_sha256(tiny.f32), round_timeout=1800)
            start = time.monotonic()
            records = list(fed.follow(work / "run", link, fed.submit(link, settings),
                                      timeout=3600))
            total = time.monotonic() - start
        finally:
            for n in nodes:
                n.stop()
            link.stop()
    return {"clients": clients, "secagg": secagg, "rounds": len(records),
            "round_s": round(statistics.mean(r["seconds"] for r in records), 1),
            "bytes_per_client": int(statistics.mean(r["bytes_per_client"] for r in records)),
            "joined": min(r["clients_joined"] for r in records), "run_s": round(total, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="3,10")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from tests import trained_model as tm

    tiny = tm.trained_model()
    rows = []
    for n in (int(c) for c in args.clients.split(",")):
        plain = measure(n, False, args.rounds, args.steps, tiny)
        print(json.dumps(plain), file=sys.stderr, flush=True)  # a long run keeps what it has
        secure = measure(n, True, args.rounds, args.steps, tiny)
        print(json.dumps(secure), file=sys.stderr, flush=True)
        for row in (plain, secure):
            row["time_vs_plain"] = round(row["round_s"] / plain["round_s"], 2)
            row["bytes_vs_plain"] = round(row["bytes_per_client"] / plain["bytes_per_client"], 2)
            rows.append(row)
    report = {"benchmark": "fed_rounds", "machine": platform.node(), "cpus": os.cpu_count(),
              "load_avg": os.getloadavg()[0], "rounds": args.rounds, "steps": args.steps,
              "rows": rows}
    print_report(report, ["clients", "secagg", "round_s", "bytes_per_client", "time_vs_plain",
                          "bytes_vs_plain", "joined"], args.json)


if __name__ == "__main__":
    main()
