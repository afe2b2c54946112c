"""Federated runs on the controller: find one by id or path and read its record.

A run directory (`state_dir()/fed/RUN_ID/`, written by the ServerApp, see issue #12's
contract) holds `run.json` (what was asked and how it ended), `rounds.jsonl` (one object per
finished round) and `adapter/` (the last aggregated LoRA adapter in peft's `save_pretrained`
format). Everything here is read and checked before it is trusted, so `claw fed export` and
`claw fed runs` fail on a broken run with one line naming the file and field, not a traceback.
Only the standard library, numpy and safetensors headers: no torch on the controller path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.errors import BadInput
from provision.paths import state_dir

STATUSES = ("running", "succeeded", "failed")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def runs_dir() -> Path:
    return state_dir() / "fed"


def file_sha256(path: Path) -> str:
    """The model file's identity: what runs record, devices are checked against and an export
    verifies before merging."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class RoundRecord:
    round: int
    clients_joined: int
    clients_dropped: int
    local_loss: float | None
    eval_loss: float | None
    seconds: float | None
    bytes_per_client: int | None


@dataclass
class Run:
    id: str
    dir: Path
    model: Path
    model_sha256: str
    rounds_planned: int
    secagg: bool
    lora: dict[str, Any]
    status: str
    started: str
    ended: str | None
    clients: list[str]
    rounds: list[RoundRecord] = field(default_factory=list)

    @property
    def final_eval_loss(self) -> float | None:
        return next((r.eval_loss for r in reversed(self.rounds) if r.eval_loss is not None), None)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "dir": str(self.dir), "model": str(self.model),
                "model_sha256": self.model_sha256, "rounds": self.rounds_planned,
                "rounds_done": len(self.rounds), "secagg": self.secagg, "lora": self.lora,
                "status": self.status, "started": self.started, "ended": self.ended,
                "clients": self.clients, "final_eval_loss": self.final_eval_loss}


def find_run(ref: str | Path) -> Path:
    """A run's directory from its id (under `runs_dir()`) or a path to the directory."""
    text = str(ref)
    path = Path(text).expanduser()
    if path.is_dir() and (path / "run.json").is_file():
        return path
    if "/" in text and path.is_dir():
        raise BadInput(f"{path}: not a run directory (expected run.json in it)")
    candidate = runs_dir() / text
    if "/" not in text and (candidate / "run.json").is_file():
        return candidate
    known = [p.name for p in list_run_dirs()]
    hint = f"; known runs: {', '.join(known[-5:])}" if known else f"; {runs_dir()} has no runs"
    raise BadInput(f"run {text!r}: no such run (expected a run id under {runs_dir()} "
                   f"or a path to a run directory{hint})")


def list_run_dirs() -> list[Path]:
    root = runs_dir()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "run.json").is_file())


def _field(data: dict[str, Any], key: str, kinds: type | tuple[type, ...], where: Path,
           expected: str, optional: bool = False) -> Any:
    if key not in data or (optional and data[key] is None):
        if optional:
            return None
        raise BadInput(f"{where}: field {key!r} is missing (expected {expected})")
    value = data[key]
    allowed = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise BadInput(f"{where}: field {key!r} is {value!r} (expected {expected})")
    return value


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_run(run_dir: Path) -> Run:
    """`run.json` and `rounds.jsonl` of one run, checked field by field."""
    where = run_dir / "run.json"
    data = _read_json_object(where)
    status = _field(data, "status", str, where, f"one of {', '.join(STATUSES)}")
    if status not in STATUSES:
        raise BadInput(f"{where}: field 'status' is {status!r} (expected one of "
                       f"{', '.join(STATUSES)})")
    lora = _field(data, "lora", dict, where, "an object with r, alpha, target_modules")
    clients = _field(data, "clients", list, where, "a list of client names")
    run = Run(
        id=_field(data, "id", str, where, "the run id"),
        dir=run_dir,
        model=Path(_field(data, "model", str, where, "the base GGUF's path")),
        model_sha256=_field(data, "model_sha256", str, where, "the base GGUF's sha256"),
        rounds_planned=_field(data, "rounds", int, where, "the number of rounds"),
        secagg=_field(data, "secagg", bool, where, "true or false"),
        lora=lora, status=status,
        started=_field(data, "started", str, where, "a timestamp"),
        ended=_field(data, "ended", str, where, "a timestamp or null", optional=True),
        clients=[str(c) for c in clients],
    )
    run.rounds = read_rounds(run_dir / "rounds.jsonl")
    return run


def read_rounds(path: Path) -> list[RoundRecord]:
    """The finished rounds; a missing file is a run with none finished yet."""
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = Path(f"{path}:{n}")
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise BadInput(f"{where}: expected a JSON object per line")
        num = (int, float)
        out.append(RoundRecord(
            round=_field(rec, "round", int, where, "the round number"),
            clients_joined=_field(rec, "clients_joined", int, where, "a count"),
            clients_dropped=_field(rec, "clients_dropped", int, where, "a count"),
            local_loss=_field(rec, "local_loss", num, where, "a number", optional=True),
            eval_loss=_field(rec, "eval_loss", num, where, "a number", optional=True),
            seconds=_field(rec, "seconds", num, where, "a number", optional=True),
            bytes_per_client=_field(rec, "bytes_per_client", int, where, "a count",
                                    optional=True)))
    return out


def list_runs() -> tuple[list[Run], list[str]]:
    """Every readable run, oldest first; and for each unreadable one, why (one line), so one
    broken record neither hides the others nor goes unmentioned."""
    runs, problems = [], []
    for folder in list_run_dirs():
        try:
            runs.append(read_run(folder))
        except BadInput as e:
            problems.append(str(e))
    return sorted(runs, key=lambda r: (r.started, r.id)), problems


# ----------------------------------------------------------------------------- the adapter

@dataclass
class Adapter:
    """A peft LoRA adapter: its config and, per adapted module (HF name, e.g.
    `model.layers.0.self_attn.q_proj`), the A (r×in) and B (out×r) matrices as float32."""

    dir: Path
    config: dict[str, Any]
    pairs: dict[str, tuple[Any, Any]]

    def scale(self, module: str, rank: int) -> float:
        """peft's scaling: alpha/r, or alpha/sqrt(r) with rsLoRA; per-module alpha from
        `alpha_pattern` (peft matches a pattern against the module name's tail)."""
        alpha = float(self.config["lora_alpha"])
        for pattern, value in (self.config.get("alpha_pattern") or {}).items():
            if module == pattern or module.endswith("." + pattern):
                alpha = float(value)
        return alpha / (rank ** 0.5 if self.config.get("use_rslora") else rank)


def read_adapter(run_dir: Path) -> Adapter:
    """The run's final adapter (`adapter/`), with peft's format checked."""
    import numpy as np

    from runtime.errors import ModelError
    from runtime.model_file import read_safetensors

    folder = run_dir / "adapter"
    cfg_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for path in (cfg_path, weights):
        if not path.is_file():
            raise BadInput(f"{path}: missing (expected the run's aggregated adapter, written "
                           "by peft's save_pretrained after the first finished round)")
    cfg = _read_json_object(cfg_path)
    if cfg.get("peft_type") != "LORA":
        raise BadInput(f"{cfg_path}: field 'peft_type' is {cfg.get('peft_type')!r} "
                       "(expected 'LORA')")
    _field(cfg, "lora_alpha", (int, float), cfg_path, "a number")
    for key, why in (("use_dora", "DoRA's magnitude vectors"), ("fan_in_fan_out", "Conv1D "
                     "layouts"), ("lora_bias", "LoRA biases")):
        if cfg.get(key):
            raise BadInput(f"{cfg_path}: field {key!r} is true ({why} cannot be merged here; "
                           "expected plain LoRA on Linear layers)")
    if cfg.get("bias", "none") != "none":
        raise BadInput(f"{cfg_path}: field 'bias' is {cfg['bias']!r} (expected 'none')")
    if cfg.get("modules_to_save"):
        raise BadInput(f"{cfg_path}: field 'modules_to_save' is {cfg['modules_to_save']!r} "
                       "(expected none: only LoRA matrices can be merged)")
    try:
        refs = read_safetensors(weights)
    except ModelError as e:
        raise BadInput(str(e)) from None
    halves: dict[str, dict[str, Any]] = {}
    for key, ref in refs.items():
        name = key.removeprefix("base_model.model.")
        for part in ("lora_A", "lora_B"):
            tail = f".{part}.weight"
            if name.endswith(tail):
                break
            if f".{part}." in name and name.endswith(".weight"):  # named adapter: .lora_A.x.w
                raise BadInput(f"{weights}: tensor {key} names an adapter; expected peft's "
                               "saved layout (…lora_A.weight)")
        else:
            raise BadInput(f"{weights}: tensor {key} is not a LoRA matrix (expected keys "
                           "ending in .lora_A.weight or .lora_B.weight)")
        if len(ref.shape) != 2:
            raise BadInput(f"{weights}: tensor {key} has shape {ref.shape} (expected 2-D)")
        halves.setdefault(name[: -len(tail)], {})[part] = np.asarray(ref.to_float32())
    pairs = {}
    for module, parts in sorted(halves.items()):
        if set(parts) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(parts)).pop()
            raise BadInput(f"{weights}: module {module} has no {missing} (expected both "
                           "lora_A and lora_B)")
        a, b = parts["lora_A"], parts["lora_B"]
        if a.shape[0] != b.shape[1]:
            raise BadInput(f"{weights}: module {module}: lora_A is {a.shape}, lora_B "
                           f"{b.shape} (expected A r×in and B out×r with the same r)")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise BadInput(f"{weights}: module {module} has non-finite values (NaN or inf)")
        pairs[module] = (a, b)
    if not pairs:
        raise BadInput(f"{weights}: no LoRA matrices in it")
    return Adapter(folder, cfg, pairs)
