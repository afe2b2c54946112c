"""The Flower ServerApp: FedAvg of LoRA adapters, SecAgg+ through Flower's own workflow.

Before round 1 every node is asked (a `query` message) for its model file's sha256; one that
differs from `model-sha256` (or from the others) fails the run, naming the node, before any
training. Rounds run in Flower's `DefaultWorkflow`, with `SecAggPlusWorkflow` as the fit
workflow when `secagg` is on (the server sees only masked, quantized vectors and their sum;
a dropped client's masks are rebuilt from its neighbours' shares). Every reply passes through
`InspectingGrid`, which drops an update of the wrong shape (logged: that client is out of the
round, the round completes) and counts the bytes each client sent. Each round is appended to
`rounds.jsonl` and the aggregated adapter rewritten in peft's format under `adapter/`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import (
    EvaluateRes,
    FitRes,
    Parameters,
    Scalar,
    bytes_to_ndarray,
    log,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from runtime.fed.client_app import PREFLIGHT
from runtime.fed.model import check_shapes, save_adapter
from runtime.fed.settings import RunSettings

app = ServerApp()


class PreflightError(RuntimeError):
    """The federation cannot start (a node's model differs, too few nodes joined)."""


def _write_json(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def update_run_record(run_dir: Path, **fields: Any) -> None:
    """Merge fields into run.json (the orchestration may have written the rest)."""
    path = run_dir / "run.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    record.setdefault("started", _now())
    record.update(fields)
    _write_json(path, record)


def message_bytes(msg: Message) -> int:
    content = msg.content
    return (sum(r.count_bytes() for r in content.array_records.values())
            + sum(r.count_bytes() for r in content.config_records.values())
            + sum(r.count_bytes() for r in content.metric_records.values()))


class InspectingGrid(Grid):
    """The run's Grid, with every reply checked (update shapes) and counted (bytes)."""

    def __init__(self, grid: Grid, shapes: list[tuple[int, ...]], names: dict[int, str],
                 capture_dir: str = "") -> None:
        self.inner, self.shapes, self.names = grid, shapes, names
        self.capture = Path(capture_dir) if capture_dir else None
        self.bytes_sent: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.rejected: dict[int, list[int]] = defaultdict(list)

    # the Grid interface, delegated
    def set_run(self, run: Any) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        return self.inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        kept = []
        for msg in replies:
            if msg.has_error():
                kept.append(msg)
                continue
            node = msg.metadata.src_node_id
            server_round = int(msg.metadata.group_id or 0)
            self.bytes_sent[server_round][node] += message_bytes(msg)
            update = self._update_of(msg)
            if update is not None:
                expected, arrays = update
                if problem := check_shapes(expected, arrays):
                    log(ERROR, "round %s: rejected the update of node %s: %s; "
                        "it is dropped from this round", server_round, self.name(node), problem)
                    self.rejected[server_round].append(node)
                    continue
                if self.capture is not None and msg.metadata.message_type == MessageType.TRAIN:
                    self.capture.mkdir(parents=True, exist_ok=True)
                    np.savez(self.capture / f"round-{server_round}-node-{node}-received.npz",
                             *arrays)
            kept.append(msg)
        return kept

    def name(self, node: int) -> str:
        return self.names.get(node) or str(node)

    def _update_of(self, msg: Message) -> tuple[list[tuple[int, ...]], list[np.ndarray]] | None:
        """(expected shapes, arrays) of a train reply's update: masked or plain."""
        if msg.metadata.message_type != MessageType.TRAIN:
            return None
        content = msg.content
        secagg = content.config_records.get(RECORD_KEY_CONFIGS)
        if secagg is not None:
            if Key.MASKED_PARAMETERS not in secagg:
                return None
            arrays = [bytes_to_ndarray(b) for b in secagg[Key.MASKED_PARAMETERS]]
            return [(1,), *self.shapes], arrays  # Flower puts the weight factor first
        if "fitres.parameters" in content.array_records:
            return self.shapes, parameters_to_ndarrays(
                compat.arrayrecord_to_parameters(content.array_records["fitres.parameters"],
                                                 keep_input=True))
        return None


class AdapterFedAvg(FedAvg):
    """FedAvg that writes each finished round to the run directory."""

    def __init__(self, settings: RunSettings, run_dir: Path, names: list[str],
                 grid: InspectingGrid, initial: list[np.ndarray]) -> None:
        k = settings.min_clients
        super().__init__(min_fit_clients=k, min_evaluate_clients=k, min_available_clients=k,
                         initial_parameters=ndarrays_to_parameters(initial),
                         on_fit_config_fn=lambda r: {"server-round": r},
                         on_evaluate_config_fn=lambda r: {"server-round": r})
        self.settings, self.run_dir, self.names, self.grid = settings, run_dir, names, grid
        self.round_started: dict[int, float] = {}
        self.sampled: dict[int, int] = {}
        self.fit_info: dict[int, dict[str, Any]] = {}

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, Any]]:
        self.round_started[server_round] = time.monotonic()
        instructions = super().configure_fit(server_round, parameters, client_manager)
        self.sampled[server_round] = len(instructions)
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        params, metrics = super().aggregate_fit(server_round, results, failures)
        losses = [float(r.metrics["loss"]) for _, r in results if "loss" in r.metrics]
        weights = [r.num_examples for _, r in results if "loss" in r.metrics]
        self.fit_info[server_round] = {
            "clients_joined": len(results),
            "clients_dropped": self.sampled.get(server_round, len(results)) - len(results),
            "local_loss": float(np.average(losses, weights=weights)) if losses else None,
        }
        if params is not None and self.settings.capture_dir:
            np.savez(Path(self.settings.capture_dir) / f"round-{server_round}-aggregate.npz",
                     *parameters_to_ndarrays(params))
        if params is not None:
            save_adapter(self.run_dir / "adapter", self.names, parameters_to_ndarrays(params),
                         self.settings.lora)
        return params, metrics

    def aggregate_evaluate(self, server_round: int,
                           results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[Any]) -> tuple[float | None, dict[str, Scalar]]:
        loss, metrics = super().aggregate_evaluate(server_round, results, failures)
        sent = self.grid.bytes_sent.get(server_round, {})
        record = {"round": server_round,
                  **self.fit_info.get(server_round, {  # the fit stage halted: nobody joined
                      "clients_joined": 0, "clients_dropped": self.sampled.get(server_round, 0),
                      "local_loss": None}),
                  "eval_loss": None if loss is None else float(loss),
                  "seconds": round(time.monotonic() - self.round_started[server_round], 3),
                  "bytes_per_client": int(np.mean(list(sent.values()))) if sent else 0,
                  "rejected": [self.grid.name(n) for n in self.grid.rejected.get(server_round,
                                                                                  [])]}
        with open(self.run_dir / "rounds.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        return loss, metrics


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise PreflightError(f"only {len(nodes)} node(s) joined in {timeout:.0f} s "
                                 f"(expected at least min-clients={count})")
        time.sleep(0.5)
    return nodes


def _ask(grid: Grid, nodes: list[int], initial: bool, timeout: float) -> list[Message]:
    messages = [Message(RecordDict({PREFLIGHT: ConfigRecord({"initial-adapter": initial})}),
                        dst_node_id=node, message_type=MessageType.QUERY) for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    for msg in replies:
        if msg.has_error():
            raise PreflightError(f"node {msg.metadata.src_node_id} failed the pre-flight "
                                 f"check: {msg.error.reason}")
    if missing := set(nodes) - {m.metadata.src_node_id for m in replies}:
        raise PreflightError(f"node(s) {sorted(missing)} did not answer the pre-flight check")
    return replies


def preflight(grid: Grid, nodes: list[int], want_sha: str,
              timeout: float) -> tuple[dict[int, str], list[str], list[np.ndarray]]:
    """Every node's model sha256 checked before round 1 (cheap: no model is loaded for it);
    then one node's initial adapter. Returns (node names, adapter keys, initial arrays)."""
    names: dict[int, str] = {}
    shas: dict[int, str] = {}
    for msg in _ask(grid, nodes, False, timeout):
        reply = msg.content.config_records[PREFLIGHT]
        node = msg.metadata.src_node_id
        names[node], shas[node] = str(reply["name"]) or str(node), str(reply["sha256"])
    reference = want_sha or shas[nodes[0]]
    for node in nodes:
        if shas[node] != reference:
            raise PreflightError(
                f"node {names[node]}: model sha256 {shas[node]} differs from the run's "
                f"{reference} (expected the same model file on every node); no round was run")
    msg = _ask(grid, nodes[:1], True, timeout)[0]
    if "adapter" not in msg.content.array_records:
        raise PreflightError(f"node {names[nodes[0]]} sent no initial adapter")
    adapter_names = list(msg.content.config_records[PREFLIGHT]["names"])  # type: ignore[arg-type]
    initial = parameters_to_ndarrays(compat.arrayrecord_to_parameters(
        msg.content.array_records["adapter"], keep_input=True))
    return names, adapter_names, initial


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_run_config(dict(context.run_config))
    if not settings.run_dir:
        raise PreflightError("run config run-dir is empty (expected the run directory)")
    run_dir = Path(settings.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    update_run_record(run_dir, status="running", rounds=settings.num_rounds,
                      secagg=settings.secagg, model_sha256=settings.model_sha256,
                      lora=settings.lora.as_dict())
    try:
        nodes = wait_for_nodes(grid, settings.min_clients, settings.round_timeout)
        names, adapter_names, initial = preflight(grid, nodes, settings.model_sha256,
                                                  settings.round_timeout)
        log(INFO, "pre-flight: %s node(s), same model sha256", len(nodes))
        update_run_record(run_dir, clients=[names[n] for n in nodes])
        inspecting = InspectingGrid(grid, [a.shape for a in initial], names,
                                    settings.capture_dir)
        strategy = AdapterFedAvg(settings, run_dir, adapter_names, inspecting, initial)
        legacy = LegacyContext(context, config=ServerConfig(settings.num_rounds,
                                                            settings.round_timeout),
                               strategy=strategy)
        fit = (SecAggPlusWorkflow(num_shares=1.0,
                                  reconstruction_threshold=settings.secagg_threshold,
                                  timeout=settings.round_timeout)
               if settings.secagg else None)
        DefaultWorkflow(fit_workflow=fit)(inspecting, legacy)
        rounds = run_dir / "rounds.jsonl"
        done = len(rounds.read_text().splitlines()) if rounds.is_file() else 0
        short = [r["round"] for r in map(json.loads, rounds.read_text().splitlines())
                 if r["clients_joined"] < settings.min_clients] if done else []
        if done < settings.num_rounds:
            raise RuntimeError(f"only {done} of {settings.num_rounds} rounds completed "
                               "(see the server log)")
        if short:
            raise RuntimeError(f"round(s) {short} of {settings.num_rounds} had fewer "
                               f"than min-clients={settings.min_clients} updates aggregated "
                               "(clients dropped before SecAgg+ could rebuild their masks, or "
                               "too few answered; see the server log)")
    except Exception as e:
        log(WARNING, "federated run failed: %s", e)
        update_run_record(run_dir, status="failed", error=str(e), ended=_now())
        raise
    update_run_record(run_dir, status="succeeded", ended=_now())
