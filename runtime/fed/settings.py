"""The run config (kebab-case keys, as `flwr run --run-config` passes them) in one place.

Both apps read it from `context.run_config`; `federation.submit` writes it. The defaults
here are the app's `[tool.flwr.app.config]` defaults too (runtime/fed/app/pyproject.toml).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runtime.fed.model import DEFAULT_TARGETS, LoraSettings


@dataclass(frozen=True)
class RunSettings:
    num_rounds: int = 3
    local_steps: int = 10
    lr: float = 3e-3
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    secagg: bool = True
    min_clients: int = 2
    run_dir: str = ""
    model_sha256: str = ""
    round_timeout: float = 600.0  # seconds a stage waits for replies (then: dropped clients)
    batch: int = 8
    seq: int = 64
    secagg_threshold: float = 0.5  # share of a key's shares needed to rebuild it (≥ 2)
    capture_dir: str = ""  # tests: where the server writes the (masked) arrays it received

    @property
    def lora(self) -> LoraSettings:
        return LoraSettings(self.lora_r, self.lora_alpha, self.target_modules)

    @classmethod
    def from_run_config(cls, config: dict[str, Any]) -> RunSettings:
        values: dict[str, Any] = {}
        for name, default in cls().__dict__.items():
            key = name.replace("_", "-")
            if key not in config:
                continue
            raw = config[key]
            if name == "target_modules":
                values[name] = tuple(m.strip() for m in str(raw).split(",") if m.strip())
            else:
                values[name] = type(default)(raw)
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        out = {}
        for name, value in self.__dict__.items():
            out[name.replace("_", "-")] = (",".join(value) if isinstance(value, tuple)
                                           else value)
        return out
