"""A node's local text as token windows: most for training, every fifth paragraph held out.

Windows start with BOS, as the base model was trained and as the runtime scores perplexity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HELD_OUT_EVERY = 5  # every fifth paragraph of the node's text is its evaluation text


@dataclass(frozen=True)
class LocalData:
    train: np.ndarray  # (n, seq) int64 windows
    held_out: np.ndarray  # (m, seq)


def read_texts(data_dir: str | os.PathLike[str]) -> list[str]:
    folder = Path(data_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such data directory (expected a folder of *.txt)")
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.txt files (expected the node's local text)")
    return [f.read_text(encoding="utf-8") for f in files]


def windows(ids: list[int], seq: int, bos: int | None, stride: int | None = None) -> np.ndarray:
    stride = stride or seq
    starts = range(0, max(len(ids) - seq + 1, 0), stride)
    out = np.array([ids[s:s + seq] for s in starts], dtype=np.int64).reshape(-1, seq)
    if bos is not None and len(out):
        out[:, 0] = bos
    return out


def tokenize(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def split_held_out(text: str) -> tuple[str, str]:
    """(training text, held-out text): every fifth paragraph is held out, so both follow the
    same mix of the node's text (a tail split would hold out whatever the file ends with)."""
    paras = [p for p in text.split("\n\n") if p.strip()]
    if len(paras) < 2 * HELD_OUT_EVERY:
        cut = int(len(text) * (1 - 1 / HELD_OUT_EVERY))
        return text[:cut], text[cut:]
    held = paras[HELD_OUT_EVERY - 1::HELD_OUT_EVERY]
    train = [p for i, p in enumerate(paras) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return "\n\n".join(train), "\n\n".join(held)


def local_data(tokenizer: Any, texts: list[str], seq: int = 64) -> LocalData:
    """Training windows overlap by half (more samples from little text); held-out ones do not."""
    bos = tokenizer.bos_token_id
    train, held = [], []
    for text in texts:
        train_text, held_text = split_held_out(text)
        train.append(windows(tokenize(tokenizer, train_text), seq, bos, stride=seq // 2))
        held.append(windows(tokenize(tokenizer, held_text), seq, bos))
    return LocalData(np.concatenate(train), np.concatenate(held))


def mean_loss(model: Any, batches: np.ndarray, batch: int = 16) -> float:
    """Mean next-token loss over windows (no gradient)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(batches), batch):
            x = torch.from_numpy(batches[i:i + batch])
            n = x.numel() - x.shape[0]
            total += float(model(input_ids=x, labels=x).loss) * n
            count += n
    return total / max(count, 1)


def train_steps(model: Any, data: np.ndarray, steps: int, lr: float, batch: int = 8,
                seed: int = 0) -> float:
    """`steps` AdamW steps on random windows (only the adapter requires grad); mean loss."""
    import torch

    rng = np.random.default_rng(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        x = torch.from_numpy(data[rng.integers(0, len(data), batch)])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return float(np.mean(losses)) if losses else float("nan")
