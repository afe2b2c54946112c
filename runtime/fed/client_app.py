"""The Flower ClientApp: fine-tune the LoRA adapter on the node's own text, send only the adapter.

Message API handlers: `query` answers the server's pre-flight (the model file's sha256, and
the initial adapter when asked), `train` runs `local-steps` AdamW steps from the global
adapter, `evaluate` scores the held-out tail of the node's text. With `secagg` on, Flower's
own `secaggplus_mod` wraps `train` (it masks the update; the server only learns the sum).
Node config: `data-dir`, `model`, optional `name` (how the server names this node) and, for
tests only, `fault=wrong-shape` (send a malformed update) and `capture-dir` (write the true
update before masking, to compare with what the server received).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters
from flwr.common import parameters_to_ndarrays as to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from runtime.fed.model import file_sha256
from runtime.fed.settings import RunSettings

PREFLIGHT = "preflight"  # the query's ConfigRecord name (request and reply)


def secagg_when_asked(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `secaggplus_mod` on SecAgg+ messages; plain FedAvg messages pass by."""
    if (msg.metadata.message_type == MessageType.TRAIN
            and RECORD_KEY_CONFIGS in msg.content.config_records):
        return secaggplus_mod(msg, ctx, call_next)
    return call_next(msg, ctx)


app = ClientApp(mods=[secagg_when_asked])


@functools.cache
def _sha256(path: str) -> str:
    return file_sha256(path)


@functools.cache
def _node(model_path: str, data_dir: str, settings: RunSettings) -> tuple[Any, Any]:
    """(peft model, LocalData), loaded once per ClientApp process."""
    import torch

    from runtime.fed.data import local_data, read_texts
    from runtime.fed.model import load_base, with_lora

    torch.set_num_threads(1)  # many nodes share few cores; one thread each is fastest overall
    base, tokenizer = load_base(model_path)
    model = with_lora(base, settings.lora)
    return model, local_data(tokenizer, read_texts(data_dir), seq=settings.seq)


def _load(ctx: Context) -> tuple[Any, Any, RunSettings]:
    settings = RunSettings.from_run_config(dict(ctx.run_config))
    model, data = _node(str(ctx.node_config["model"]), str(ctx.node_config["data-dir"]),
                        settings)
    return model, data, settings


@app.query()
def query(msg: Message, ctx: Context) -> Message:
    """The pre-flight: this node's model sha256, name, and (when asked) the initial adapter."""
    want = msg.content.config_records.get(PREFLIGHT, ConfigRecord())
    reply = ConfigRecord({"sha256": _sha256(str(ctx.node_config["model"])),
                          "name": str(ctx.node_config.get("name", ""))})
    content = RecordDict({PREFLIGHT: reply})
    if want.get("initial-adapter", False):
        from runtime.fed.model import adapter_state

        model, _, _ = _load(ctx)
        state = adapter_state(model)
        reply["names"] = list(state)
        content["adapter"] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters(list(state.values())), keep_input=True)
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, ctx: Context) -> Message:
    from runtime.fed.data import train_steps
    from runtime.fed.model import get_adapter, set_adapter

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    model, data, s = _load(ctx)
    set_adapter(model, to_ndarrays(fitins.parameters))
    server_round = int(fitins.config.get("server-round", 0))
    loss = train_steps(model, data.train, s.local_steps, s.lr, batch=s.batch,
                       seed=server_round * 1_000_003 + int(msg.metadata.dst_node_id) % 1_000_003)
    update = get_adapter(model)
    if ctx.node_config.get("fault", "") == "wrong-shape":
        update[0] = update[0][:, :-1]
    if capture := str(ctx.node_config.get("capture-dir", "")):
        out = Path(capture)
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / f"round-{server_round}-node-{msg.metadata.dst_node_id}-true.npz",
                 *update)
    res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(update),
                 num_examples=s.local_steps * s.batch, metrics={"loss": loss})
    return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, ctx: Context) -> Message:
    from runtime.fed.data import mean_loss
    from runtime.fed.model import set_adapter

    ins = compat.recorddict_to_evaluateins(msg.content, keep_input=True)
    model, data, _ = _load(ctx)
    set_adapter(model, to_ndarrays(ins.parameters))
    loss = mean_loss(model, data.held_out)
    res = EvaluateRes(Status(Code.OK, "ok"), loss, num_examples=len(data.held_out), metrics={})
    return Message(compat.evaluateres_to_recorddict(res), reply_to=msg)
