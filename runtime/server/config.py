"""The server's one YAML file (`claw runtime serve --config FILE`), validated before anything
starts so that a typo fails the service at once with `FILE:LINE: field: problem (expected …)`
instead of surfacing as odd behaviour under load.

    model: /models/smollm-q8_0.gguf
    host: 0.0.0.0
    port: 8080
    api_key_file: /etc/clawforge/api_key
    backend: auto
    scheduler: {max_batch: 4, max_queue: 64}
    offload: {enabled: true, url: http://cloud:8000/v1, model: big, api_key_env: CLOUD_KEY}
    monitor: {profile: rk3588, interval_s: 1}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from runtime.errors import ModelError

Fraction = Annotated[float, Field(gt=0, le=1)]
FilePath = Annotated[Path, Field(strict=False)]  # YAML gives text; every other field is strict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SchedulerConfig(Section):
    """Local queueing: how many sequences decode together and how much work may wait."""

    max_batch: int = Field(4, ge=1, le=256, description="sequences decoded in one step")
    max_queue: int = Field(64, ge=1, le=100_000, description="waiting requests, all priorities")
    background_queue: int | None = Field(
        None, ge=0, description="background refused (429) at this depth; default max_queue/2")
    critical_reserve: int = Field(16, ge=0, description="extra room only critical work may use")
    retry_after_s: int = Field(2, ge=1, le=3600, description="Retry-After on 429/503")
    max_tokens_limit: int = Field(4096, ge=1, description="larger max_tokens is a 400")
    default_max_tokens: int = Field(256, ge=1, description="when a request names none")

    @model_validator(mode="after")
    def _background_fits(self) -> SchedulerConfig:
        if self.background_queue is None:
            self.background_queue = max(1, self.max_queue // 2)
        if self.background_queue > self.max_queue:
            raise ValueError(f"scheduler.background_queue: {self.background_queue} exceeds "
                             f"max_queue {self.max_queue} (expected ≤ max_queue)")
        return self


class OffloadConfig(Section):
    """The remote OpenAI-compatible endpoint that takes non-critical work under pressure."""

    enabled: bool = False
    url: str | None = Field(None, pattern=r"^https?://[^\s/]+(/\S*)?$",
                            description="base URL including /v1, e.g. http://cloud:8000/v1")
    model: str | None = Field(None, min_length=1, description="model name at the remote")
    api_key_file: FilePath | None = None
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    timeout_s: float = Field(30.0, gt=0, le=3600, description="connect and per-read timeout")
    retries: int = Field(2, ge=0, le=20, description="extra attempts before falling back")
    backoff_s: float = Field(0.5, ge=0, le=60, description="first retry delay, doubled after")
    max_inflight: int = Field(64, ge=1, description="more offloaded at once stay local")

    @model_validator(mode="after")
    def _url_when_enabled(self) -> OffloadConfig:
        if self.enabled and not self.url:
            raise ValueError("offload.url: missing (expected the remote's base URL, e.g. "
                             "http://cloud:8000/v1, when offload.enabled is true)")
        return self

    def api_key(self) -> str | None:
        if self.api_key_env and os.environ.get(self.api_key_env):
            return os.environ[self.api_key_env]
        if self.api_key_file:
            return read_key_file(self.api_key_file, "offload.api_key_file")
        return None


class MonitorConfig(Section):
    """Where pressure thresholds come from: a device profile's `pressure:` section, then any
    threshold set here (which wins)."""

    profile: str | None = Field(None, description="device profile whose thresholds to use")
    interval_s: float = Field(1.0, gt=0, le=60)
    psi_some_avg10: float | None = Field(None, ge=0, le=100)
    mem_available_min_fraction: Fraction | None = None
    cgroup_usage_max_fraction: Fraction | None = None
    swap_used_max_fraction: Fraction | None = None
    gpu_memory_max_fraction: Fraction | None = None
    clear_ratio: Fraction | None = None
    hold_s: float | None = Field(None, ge=0, le=3600)
    # Test hook, documented: a JSON file whose keys replace the matching measured signals
    # (e.g. {"psi_some_avg10": 50}); used by the fault-matrix tests, never by deployments.
    inject_file: FilePath | None = None


class ServeConfig(Section):
    model: FilePath | None = Field(None, description="GGUF file or Hugging Face directory")
    model_name: str | None = Field(None, min_length=1, description="id in /v1/models")
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8080, ge=0, le=65535)
    api_key_file: FilePath | None = None
    backend: Literal["numpy", "opencl", "auto"] = "auto"
    context: int | None = Field(None, ge=16, description="context size (tokens)")
    memory_budget: str | int | None = Field(None, description="resident memory for the whole "
                                            "process, e.g. 512M or 2G: layers past it stream "
                                            "from disk (numpy backend)")
    threads: int | None = Field(None, ge=1, le=256, description="BLAS threads (default: the "
                                "library's, one per core); fewer when the cores are shared")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    offload: OffloadConfig = Field(default_factory=OffloadConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)

    @field_validator("memory_budget")
    @classmethod
    def _budget_is_a_size(cls, value: str | int | None) -> str | int | None:
        from runtime.memory_plan import parse_budget

        try:
            parse_budget(value, "memory_budget")
        except ModelError as exc:
            raise ValueError(str(exc).removeprefix("memory_budget ")) from None
        return value

    def served_name(self) -> str:
        if self.model_name:
            return self.model_name
        return self.model.name.removesuffix(".gguf") if self.model else "model"


def read_key_file(path: Path, field: str) -> str:
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ModelError(f"{field}: cannot read {path}: {exc.strerror} (expected a file "
                         "holding the API key)") from None
    if not key:
        raise ModelError(f"{field}: {path} is empty (expected a file holding the API key)")
    return key


def load_config(path: Path | None, **overrides: object) -> ServeConfig:
    """Read and validate `path` (or defaults), then apply non-None `overrides` (CLI flags).
    Problems are raised as `BadInputs`, one `FILE:LINE: field: …` line each."""
    from provision.errors import BadInput, BadInputs
    from provision.validation import validation_lines
    from provision.yamlsource import SourcedYaml, load_yaml

    src = load_yaml(path, "runtime config") if path else SourcedYaml(Path("(flags)"), {})
    data = src.data if src.data is not None else {}
    if not isinstance(data, dict):
        raise BadInput(f"{src.path}:1: runtime config: expected a mapping of fields (model, "
                       "host, port, scheduler, offload, monitor, …)")
    data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        config = ServeConfig.model_validate(data)
    except ValidationError as exc:
        raise BadInputs(validation_lines(src, exc)) from None
    if config.monitor.profile:
        from provision.profiles import ProfileStore

        try:
            ProfileStore().get(config.monitor.profile)
        except BadInput as exc:
            raise BadInput(f"{src.where(('monitor', 'profile'))}: monitor.profile: {exc}") \
                from None
    return config
