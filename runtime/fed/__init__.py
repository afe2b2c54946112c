"""Federated LoRA fine-tuning on Flower (needs the `fed` extra: flwr, torch, transformers, peft).

`model` loads the runtime's GGUF into transformers' Llama and wraps it with peft LoRA; `data`
turns a node's local text into token windows; `client_app` / `server_app` are the Flower apps
(FedAvg of adapter arrays, SecAgg+ through Flower's own workflow and mod); `federation` starts a
SuperLink and SuperNodes, submits a run and follows its `rounds.jsonl`.
"""
