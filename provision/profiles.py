"""Device profiles: the hardware abstraction every other part of ClawForge reads.

A profile names what is board-specific (CPU clusters, RAM options, GPU and OpenCL stack, kernel
and bootloader packages, zram/hugepages sizing, runtime defaults). Profiles ship in
`provision/data/profiles/`; a user directory may add new ones or override shipped ones by name,
and a profile may `extends:` another and change only what differs.
"""

from __future__ import annotations

import difflib
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from provision.errors import BadInput, BadInputs
from provision.paths import user_profiles_dir
from provision.validation import validation_lines
from provision.yamlsource import SourcedYaml, load_yaml

Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=64)]
Fraction = Annotated[float, Field(gt=0, le=1)]
Governor = Literal["performance", "schedutil", "ondemand", "conservative", "powersave", "userspace"]
OpenCLStackName = Literal["pocl", "pocl-cuda", "rusticl", "mali-blob", "nvidia", "none"]
Bootloader = Literal["u-boot", "rpi-firmware", "uefi", "l4t", "direct-kernel"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class CpuCluster(Strict):
    """A set of identical cores; inference threads are pinned to the fastest cluster."""

    name: Name
    core: str = Field(min_length=1, description="core type, e.g. Cortex-A76")
    cores: list[Annotated[int, Field(ge=0, le=255)]] = Field(min_length=1)
    max_mhz: int = Field(gt=0, le=6000)


class OpenCLStack(Strict):
    """One way to get an OpenCL ICD on the board."""

    name: OpenCLStackName
    packages: list[str] = Field(default_factory=list, description="Debian packages to install")
    icd: str | None = Field(None, description="file under /etc/OpenCL/vendors/")
    kernel_driver: str | None = Field(None, description="kernel module this stack needs")
    env: dict[str, str] = Field(default_factory=dict, description="environment the ICD needs")
    backports: bool = Field(False, description="install the packages from the target's "
                            "<release>-backports (e.g. Mesa 25 on bookworm, for panthor)")


class Gpu(Strict):
    name: str | None = Field(None, description="None on boards with no OpenCL-capable GPU")
    opencl: list[OpenCLStack] = Field(min_length=1, description="supported stacks, default first")


class OsImage(Strict):
    """What `claw os build` puts on the disk for this board."""

    distro: Literal["debian", "ubuntu"] = "debian"
    suite: Literal["bookworm", "trixie", "jammy", "noble"] = "bookworm"
    kernel_packages: list[str] = Field(min_length=1)
    kernel_suite: str | None = Field(
        None, pattern=r"^[a-z]+-backports$",
        description="install the kernel packages from this suite (e.g. bookworm-backports, "
                    "whose 6.12 kernel carries device trees the release's 6.1 lacks; or the "
                    "next release's backports, e.g. trixie-backports' 7.x for the Pi 5)")
    firmware_packages: list[str] = Field(default_factory=list)
    bootloader: Bootloader
    dtb: str | None = None
    initramfs_modules: list[str] | None = Field(
        None, description="kernel modules the board needs to reach its root, added to the "
                          "initramfs (MODULES=list, one quick build); unset: every storage "
                          "driver (MODULES=most, slow under qemu-user) for uefi and u-boot "
                          "boards, the base's virtio list otherwise")
    console: str = Field(min_length=1)
    boot_partition_mb: int = Field(ge=64, le=4096)
    root_device: str = Field(min_length=1, description="root= on the kernel command line")


class ZramRule(Strict):
    fraction_of_ram: float = Field(gt=0, le=1.5, description="zram disk size / physical RAM")
    algorithm: Literal["lz4", "zstd", "lzo-rle", "lzo"]
    max_mb: int | None = Field(None, gt=0)
    priority: int = Field(100, ge=-1, le=32767)


class HugepagesRule(Strict):
    page_kb: Literal[64, 2048, 32768, 524288, 1048576]
    fraction_of_model: float = Field(ge=0, le=2, description="pages reserved per model byte")
    max_fraction_of_ram: Fraction


class RuntimeDefaults(Strict):
    backend: Literal["numpy", "opencl", "auto"]
    threads: int = Field(ge=1, le=256)
    cpu_affinity: list[int] = Field(min_length=1, description="cores kept for inference")
    memory_budget_fraction: Fraction = Field(description="share of RAM the runtime may hold")
    prefill_chunk: int = Field(ge=16, le=8192)
    context: int = Field(ge=128, le=1_048_576)


class PressureThresholds(Strict):
    """When the runtime starts offloading non-critical work (issue: serving and offload)."""

    psi_some_avg10: float = Field(ge=0, le=100, description="/proc/pressure/memory some avg10")
    mem_available_min_fraction: Fraction
    cgroup_usage_max_fraction: Fraction = Field(
        0.9, description="the runtime container's memory usage / its limit")
    swap_used_max_fraction: Fraction = Field(0.5, description="swap (zram included) in use")
    gpu_memory_max_fraction: Fraction = Field(0.9, description="OpenCL device memory in use")
    clear_ratio: Fraction = Field(
        0.8, description="pressure ends when every signal is back within ratio × its threshold")
    hold_s: float = Field(5.0, ge=0, le=3600, description="seconds calm before work returns")


HookStep = Literal["before_download", "after_download", "before_install", "after_install",
                   "before_commit", "after_commit", "before_rollback", "after_rollback"]
RolloutHooks = dict[HookStep, list[Annotated[str, Field(min_length=1)]]]


class RolloutDefaults(Strict):
    """What a fleet rollout runs on boards of this profile (Mender-style state scripts)."""

    hooks: RolloutHooks = Field(default_factory=dict, description="shell commands per step")


class DeviceProfile(Strict):
    name: Name
    description: str = Field(min_length=1)
    extends: Name | None = None
    arch: Literal["arm64", "amd64"]
    soc: str = Field(min_length=1)
    boards: list[str] = Field(min_length=1)
    ram_gb: list[Annotated[int, Field(ge=1, le=1024)]] = Field(min_length=1)
    cpu: list[CpuCluster] = Field(min_length=1)
    gpu: Gpu
    governor: Governor
    zram: ZramRule
    hugepages: HugepagesRule
    os: OsImage
    runtime: RuntimeDefaults
    pressure: PressureThresholds
    rollout: RolloutDefaults = Field(default_factory=RolloutDefaults)

    @model_validator(mode="after")
    def _consistent(self) -> DeviceProfile:
        ids = [c for cluster in self.cpu for c in cluster.cores]
        if len(ids) != len(set(ids)):
            twice = sorted({c for c in ids if ids.count(c) > 1})
            raise ValueError(f"cpu: cores {twice} appear in two clusters (expected each core "
                             "id in exactly one cluster)")
        unknown = sorted(set(self.runtime.cpu_affinity) - set(ids))
        if unknown:
            raise ValueError(f"runtime.cpu_affinity: cores {unknown} are not in any cpu cluster "
                             f"(expected a subset of {sorted(ids)})")
        if self.runtime.threads > len(ids):
            raise ValueError(f"runtime.threads: {self.runtime.threads} exceeds the "
                             f"{len(ids)} cores (expected ≤ {len(ids)})")
        if sorted(set(self.ram_gb)) != self.ram_gb:
            raise ValueError(f"ram_gb: {self.ram_gb} is not valid (expected sizes in ascending "
                             "order without repeats)")
        return self

    @cached_property
    def core_ids(self) -> list[int]:
        return sorted(c for cluster in self.cpu for c in cluster.cores)

    @property
    def opencl_stacks(self) -> list[str]:
        return [s.name for s in self.gpu.opencl]

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "arch": self.arch,
            "soc": self.soc,
            "cores": len(self.core_ids),
            "ram_gb": self.ram_gb,
            "gpu": self.gpu.name or "-",
            "opencl": self.opencl_stacks,
            "description": self.description,
        }


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; lists and scalars in `over` replace those in `base`."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class ProfileStore:
    """All known profiles: shipped ones, then the user's directory (which wins by name)."""

    def __init__(self, user_dir: Path | None = None):
        self.user_dir = user_dir if user_dir is not None else user_profiles_dir()
        self._sources: dict[str, SourcedYaml] = {}
        self._origin: dict[str, str] = {}
        self._cache: dict[str, DeviceProfile] = {}
        shipped = resources.files("provision.data") / "profiles"
        for entry in sorted(shipped.iterdir(), key=lambda p: p.name):
            if entry.name.endswith(".yml"):
                self._add(Path(str(entry)), "shipped")
        if self.user_dir.is_dir():
            for path in sorted(self.user_dir.glob("*.y*ml")):
                self._add(path, "user")

    def _add(self, path: Path, origin: str) -> None:
        src = load_yaml(path, "device profile")
        if not isinstance(src.data, dict):
            raise BadInput(f"{path}:1: profile: expected a mapping of profile fields")
        name = src.data.get("name")
        if not isinstance(name, str):
            raise BadInput(f"{src.where(('name',))}: name: missing or not a string "
                           "(expected the profile's name)")
        if name != path.stem:
            raise BadInput(f"{src.where(('name',))}: name: {name!r} differs from the file name "
                           f"(expected {path.stem!r})")
        self._sources[name] = src
        self._origin[name] = origin

    def names(self) -> list[str]:
        return sorted(self._sources)

    def origin(self, name: str) -> str:
        return self._origin[name]

    def source(self, name: str) -> SourcedYaml:
        return self._sources[name]

    def get(self, name: str) -> DeviceProfile:
        if name not in self._cache:
            self._cache[name] = self._resolve(name, ())
        return self._cache[name]

    def _resolve(self, name: str, chain: tuple[str, ...]) -> DeviceProfile:
        if name not in self._sources:
            near = difflib.get_close_matches(name, self.names(), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise BadInput(f"unknown profile {name!r} (expected one of: "
                           f"{', '.join(self.names())}{hint})")
        src = self._sources[name]
        data = dict(src.data)
        parent = data.get("extends")
        if parent is not None:
            if parent in (*chain, name):
                raise BadInput(f"{src.where(('extends',))}: extends: cycle "
                               f"{' -> '.join((*chain, name, parent))}")
            if parent not in self._sources:
                raise BadInput(f"{src.where(('extends',))}: extends: unknown profile {parent!r} "
                               f"(expected one of: {', '.join(self.names())})")
            base = self._resolve(parent, (*chain, name)).model_dump(mode="json")
            base.pop("extends", None)
            data = _deep_merge(base, data)
        try:
            return DeviceProfile.model_validate(data)
        except ValidationError as exc:
            raise BadInputs(validation_lines(src, exc)) from None

    def check_all(self) -> list[str]:
        """Every problem in every profile, for `claw profiles check`."""
        problems: list[str] = []
        for name in self.names():
            try:
                self.get(name)
            except BadInputs as exc:
                problems.extend(exc.problems)
            except BadInput as exc:
                problems.append(str(exc))
        return problems
