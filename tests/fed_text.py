"""Local text for federated tests: each device's own sensor log, and the held-out loss on the
union of the devices' shards.

The base (tests/trained_model.py) was trained on licence texts: more licence text gives no
held-out gain to measure (a centralised LoRA: 3.344 → 3.365 nats), while these logs are text
the base does not know and an adapter learns fast. Each device logs a different main sensor
(70 % of its lines, temperature the rest): non-IID shards, as a fleet's are.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

SENSORS = [("temperature", "C", 15, 30), ("humidity", "%", 30, 70), ("voltage", "V", 4, 6)]


def sensor_shards(n: int = 3, lines: int = 400) -> list[str]:
    """One log text per device; blank lines make paragraphs (every fifth one is held out)."""
    shards = []
    for i in range(n):
        rng, out = random.Random(i), []
        for k in range(lines):
            name, unit, lo, hi = (SENSORS[i % len(SENSORS)] if rng.random() < 0.7
                                  else SENSORS[0])
            out.append(f"device {i} sensor {name} reads {rng.uniform(lo, hi):.1f} {unit}, "
                       "status ok.")
            if k % 8 == 7:
                out.append("")
        shards.append("\n".join(out))
    return shards


def held_out_windows(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) token windows of the union of the shards, as the clients cut them."""
    from runtime.fed.data import local_data

    datas = [local_data(tokenizer, [text]) for text in texts]
    return (np.concatenate([d.train for d in datas]),
            np.concatenate([d.held_out for d in datas]))


def held_out_loss(model: Path, texts: list[str], adapter_dir: Path | None = None) -> float:
    """Mean held-out loss (nats/token) of the GGUF `model`, with a peft adapter if given."""
    from peft import PeftModel

    from runtime.fed.data import mean_loss
    from runtime.fed.model import load_base

    base, tok = load_base(model)
    _, held = held_out_windows(tok, texts)
    tuned = PeftModel.from_pretrained(base, str(adapter_dir)) if adapter_dir else base
    return mean_loss(tuned, held)
