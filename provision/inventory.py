"""Ansible YAML inventories, checked against device profiles before anything runs.

An inventory is an ordinary Ansible YAML inventory (`all:` with `hosts`, `children`, `vars`).
Each host must end up with `claw_profile`, from its own vars or a group's, and may override
profile values with the `claw_*` variables of `HostVars`. Variables are merged the way Ansible
merges them (all < parent groups < child groups < host; `group_vars/` and `host_vars/` files
beside the inventory override the inventory file), and each value keeps the file and line it
came from, so a problem is reported as `FILE:LINE: field: what is wrong (expected …)`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from provision.errors import BadInput, BadInputs
from provision.profiles import (
    DeviceProfile,
    Governor,
    Name,
    OpenCLStackName,
    ProfileStore,
    RolloutHooks,
)
from provision.validation import describe
from provision.yamlsource import SourcedYaml, YamlPath, load_yaml

Port = Annotated[int, Field(ge=1, le=65535)]
VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
HOST_RANGE = re.compile(r"^(?P<pre>[^\[\]]*)\[(?P<lo>\d+):(?P<hi>\d+)\](?P<post>[^\[\]]*)$")
GROUP_KEYS = ("hosts", "children", "vars")


class HostVars(BaseModel):
    """The variables ClawForge reads from a host, with their types.

    `claw_*` names are ours, so an unknown one is an error (a typo would silently do nothing);
    Ansible's connection variables are type-checked; all other variables pass through.
    """

    model_config = ConfigDict(extra="allow", strict=True)

    claw_profile: Name
    claw_ram_gb: int | None = Field(None, ge=1, description="one of the profile's ram_gb")
    claw_opencl_stack: OpenCLStackName | None = None
    claw_governor: Governor | None = None
    claw_zram_fraction: float | None = Field(None, gt=0, le=1.5)
    claw_zram_algorithm: Literal["lz4", "zstd", "lzo-rle", "lzo"] | None = None
    claw_hugepages_mb: int | None = Field(None, ge=0)
    claw_runtime_backend: Literal["numpy", "opencl", "auto"] | None = None
    claw_runtime_threads: int | None = Field(None, ge=1, le=256)
    claw_runtime_cpu_affinity: list[int] | None = None
    claw_runtime_port: Port | None = None
    claw_runtime_model: str | None = None
    # The claw_runtime role's knobs a fleet sets (see playbooks/roles/claw_runtime/README.md).
    claw_runtime_install: Literal["wheel", "container"] | None = None
    claw_runtime_image: str | None = None
    claw_runtime_host: str | None = None
    claw_runtime_api_key_file: str | None = None
    claw_runtime_pip_args: list[str] | None = None
    claw_runtime_config: dict[str, Any] | None = None
    # Commands a fleet rollout runs on the device per step (see the claw_release role); they
    # replace the profile's rollout.hooks step by step.
    claw_rollout_hooks: RolloutHooks | None = None
    # Apply only the persistent part of every setting (the claw role's switch): an offline
    # target such as an image being built. `claw os` sets it; chroots are detected anyway.
    claw_offline: bool | None = None

    ansible_host: str | None = None
    ansible_port: Port | None = None
    ansible_user: str | None = None
    ansible_connection: (
        Literal["ssh", "local", "paramiko", "docker", "community.docker.docker", "chroot"] | None
    ) = None
    ansible_ssh_private_key_file: str | None = None
    ansible_python_interpreter: str | None = None


CLAW_VARS = sorted(n for n in HostVars.model_fields if n.startswith("claw_"))


@dataclass
class Origin:
    """Where a variable's effective value was written."""

    file: Path
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Host:
    name: str
    origin: Origin
    groups: list[str] = field(default_factory=list)
    vars: dict[str, Any] = field(default_factory=dict)
    var_origins: dict[str, Origin] = field(default_factory=dict)
    profile: DeviceProfile | None = None
    settings: HostVars | None = None

    def effective(self) -> dict[str, Any]:
        """Profile values with this host's overrides applied: what provisioning will use."""
        assert self.profile is not None and self.settings is not None
        p, s = self.profile, self.settings
        return {
            "host": self.name,
            "profile": p.name,
            "address": s.ansible_host or self.name,
            "port": s.ansible_port or 22,
            "ram_gb": s.claw_ram_gb or p.ram_gb[0],
            "opencl_stack": s.claw_opencl_stack or p.opencl_stacks[0],
            "governor": s.claw_governor or p.governor,
            "zram": {"fraction_of_ram": s.claw_zram_fraction or p.zram.fraction_of_ram,
                     "algorithm": s.claw_zram_algorithm or p.zram.algorithm},
            "hugepages_mb": s.claw_hugepages_mb,
            "runtime": {"backend": s.claw_runtime_backend or p.runtime.backend,
                        "threads": s.claw_runtime_threads or p.runtime.threads,
                        "cpu_affinity": s.claw_runtime_cpu_affinity or p.runtime.cpu_affinity,
                        "port": s.claw_runtime_port or 8080},
            "groups": self.groups,
        }


@dataclass
class _Group:
    name: str
    depth: int
    hosts: set[str] = field(default_factory=set)
    children: set[str] = field(default_factory=set)
    vars: list[tuple[str, Any, Origin]] = field(default_factory=list)


@dataclass
class Inventory:
    path: Path
    hosts: dict[str, Host]
    groups: dict[str, list[str]]


class _Parser:
    """Walks the inventory's structure, collecting every problem instead of stopping at one."""

    def __init__(self, src: SourcedYaml):
        self.src = src
        self.problems: list[str] = []
        self.groups: dict[str, _Group] = {"all": _Group("all", 0)}
        self.hosts: dict[str, Host] = {}
        self.host_vars: dict[str, list[tuple[str, Any, Origin]]] = {}

    def problem(self, loc: YamlPath, what: str, text: str, src: SourcedYaml | None = None) -> None:
        src = src or self.src
        self.problems.append(f"{src.where(loc)}: {what}: {text}")

    def origin(self, loc: YamlPath, src: SourcedYaml | None = None) -> Origin:
        src = src or self.src
        return Origin(src.path, src.line_of(loc))

    def parse(self) -> None:
        data = self.src.data
        if data is None:
            self.problem((), "inventory", "empty file (expected a mapping such as "
                         "`all: {hosts: …}`)")
            return
        if not isinstance(data, dict):
            self.problem((), "inventory", f"top level is a {type(data).__name__} "
                         "(expected a mapping of group names, e.g. `all:`)")
            return
        for name, body in data.items():
            self.group(str(name), body, (name,), depth=0 if name == "all" else 1)
            if name != "all":
                self.groups["all"].children.add(str(name))

    def group(self, name: str, body: Any, loc: YamlPath, depth: int) -> None:
        if not VAR_NAME.match(name):
            self.problem(loc, f"group {name!r}", "invalid group name (expected letters, digits "
                         "and underscores, not starting with a digit)")
        group = self.groups.setdefault(name, _Group(name, depth))
        group.depth = max(group.depth, depth)
        if body is None:
            return
        if not isinstance(body, dict):
            self.problem(loc, f"group {name!r}", f"is a {type(body).__name__} "
                         "(expected a mapping with hosts, children or vars)")
            return
        for key in body:
            if key not in GROUP_KEYS:
                self.problem((*loc, key), f"{name}.{key}", "unknown field "
                             "(expected hosts, children or vars)")
        hosts = body.get("hosts")
        if hosts is not None and not isinstance(hosts, dict):
            self.problem((*loc, "hosts"), f"{name}.hosts", f"is a {type(hosts).__name__} "
                         "(expected a mapping of host names)")
        elif hosts:
            for host_key, host_vars in hosts.items():
                for host in self.expand(str(host_key), (*loc, "hosts", host_key)):
                    group.hosts.add(host)
                    self.host(host, host_vars, (*loc, "hosts", host_key))
        group.vars.extend(self.vars_block(body.get("vars"), (*loc, "vars"), f"{name}.vars"))
        children = body.get("children")
        if children is not None and not isinstance(children, dict):
            self.problem((*loc, "children"), f"{name}.children",
                         f"is a {type(children).__name__} (expected a mapping of group names)")
        elif children:
            for child, child_body in children.items():
                group.children.add(str(child))
                self.group(str(child), child_body, (*loc, "children", child), depth + 1)

    def expand(self, host: str, loc: YamlPath) -> list[str]:
        """Ansible's numeric host ranges: `dev[01:12]` → dev01 … dev12."""
        match = HOST_RANGE.match(host)
        if not match:
            return [host]
        lo, hi = match["lo"], match["hi"]
        if int(lo) > int(hi):
            self.problem(loc, f"host {host!r}", "range start is after its end (expected [lo:hi])")
            return []
        width = len(lo) if lo.startswith("0") else 0
        return [f"{match['pre']}{i:0{width}d}{match['post']}" for i in range(int(lo), int(hi) + 1)]

    def host(self, name: str, body: Any, loc: YamlPath) -> None:
        if name not in self.hosts:
            self.hosts[name] = Host(name, self.origin(loc))
        if body is not None and not isinstance(body, dict):
            self.problem(loc, f"host {name!r}", f"is a {type(body).__name__} "
                         "(expected a mapping of variables or nothing)")
            return
        self.host_vars.setdefault(name, []).extend(self.vars_block(body, loc, f"host {name}"))

    def vars_block(self, body: Any, loc: YamlPath, what: str,
                   src: SourcedYaml | None = None) -> list[tuple[str, Any, Origin]]:
        if body is None:
            return []
        if not isinstance(body, dict):
            self.problem(loc, what, f"is a {type(body).__name__} (expected a mapping of variables)",
                         src)
            return []
        out = []
        for key, value in body.items():
            if not isinstance(key, str) or not VAR_NAME.match(key):
                self.problem((*loc, key), f"{what}: {key!r}", "invalid variable name (expected "
                             "letters, digits and underscores)", src)
                continue
            out.append((key, value, self.origin((*loc, key), src)))
        return out

    def side_files(self) -> None:
        """`group_vars/NAME.yml` and `host_vars/NAME.yml` beside the inventory, as Ansible reads."""
        base = self.src.path.parent
        for kind, names in (("group_vars", list(self.groups)), ("host_vars", list(self.hosts))):
            for name in names:
                for suffix in (".yml", ".yaml", ""):
                    path = base / kind / f"{name}{suffix}"
                    if path.is_file():
                        src = load_yaml(path, f"{kind} file")
                        block = self.vars_block(src.data, (), f"{kind}/{path.name}", src)
                        if kind == "group_vars":
                            self.groups[name].vars.extend(block)
                        else:
                            self.host_vars[name].extend(block)
                        break


def _ancestors(groups: dict[str, _Group], name: str) -> set[str]:
    parents = {g.name for g in groups.values() if name in g.children}
    out = set(parents)
    for parent in parents:
        out |= _ancestors(groups, parent)
    return out


def _merge_vars(parser: _Parser) -> None:
    for host in parser.hosts.values():
        direct = {g.name for g in parser.groups.values() if host.name in g.hosts}
        member = set(direct)
        for name in direct:
            member |= _ancestors(parser.groups, name)
        member.add("all")
        ordered = sorted(member, key=lambda n: (parser.groups[n].depth, n))
        host.groups = [n for n in ordered if n != "all"]
        for group_name in ordered:
            for key, value, origin in parser.groups[group_name].vars:
                host.vars[key], host.var_origins[key] = value, origin
        for key, value, origin in parser.host_vars.get(host.name, []):
            host.vars[key], host.var_origins[key] = value, origin


def _check_host(host: Host, store: ProfileStore) -> list[str]:
    """Types of the host's variables, then their values against the host's profile."""
    problems: list[str] = []

    def bad(var: str, text: str) -> None:
        where = host.var_origins.get(var, host.origin)
        problems.append(f"{where}: {host.name}: {var}: {text}")

    for var in host.vars:
        if var.startswith("claw_") and var not in CLAW_VARS:
            near = difflib.get_close_matches(var, CLAW_VARS, n=1)
            hint = (f"did you mean {near[0]}?" if near
                    else f"expected one of: {', '.join(CLAW_VARS)}")
            bad(var, f"unknown ClawForge variable ({hint})")
    if "claw_profile" not in host.vars:
        problems.append(f"{host.origin}: {host.name}: claw_profile: missing (expected one of: "
                        f"{', '.join(store.names())}, set on the host or one of its groups)")
        return problems
    known = {k: v for k, v in host.vars.items() if k in HostVars.model_fields}
    try:
        host.settings = HostVars.model_validate(known)
    except ValidationError as exc:
        for err in exc.errors():
            var = str(err["loc"][0])
            # pydantic marks a bad dict key with a "[key]" step: the key is the place
            bad(var + "".join(f"[{p}]" for p in err["loc"][1:] if p != "[key]"), describe(err))
        return problems
    s = host.settings
    if s.claw_profile not in store.names():
        near = difflib.get_close_matches(s.claw_profile, store.names(), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        bad("claw_profile", f"unknown profile {s.claw_profile!r} (expected one of: "
            f"{', '.join(store.names())}{hint})")
        return problems
    host.profile = p = store.get(s.claw_profile)
    if s.claw_ram_gb is not None and s.claw_ram_gb not in p.ram_gb:
        bad("claw_ram_gb", f"{s.claw_ram_gb} GB is not a {p.name} option (expected one of "
            f"{p.ram_gb})")
    if s.claw_opencl_stack is not None and s.claw_opencl_stack not in p.opencl_stacks:
        bad("claw_opencl_stack", f"{s.claw_opencl_stack!r} is not supported on {p.name} "
            f"(expected one of: {', '.join(p.opencl_stacks)})")
    if s.claw_runtime_threads is not None and s.claw_runtime_threads > len(p.core_ids):
        bad("claw_runtime_threads", f"{s.claw_runtime_threads} exceeds {p.name}'s "
            f"{len(p.core_ids)} cores (expected ≤ {len(p.core_ids)})")
    if s.claw_runtime_cpu_affinity is not None:
        unknown = sorted(set(s.claw_runtime_cpu_affinity) - set(p.core_ids))
        if unknown or not s.claw_runtime_cpu_affinity:
            bad("claw_runtime_cpu_affinity", f"cores {unknown or '[]'} are not on {p.name} "
                f"(expected a non-empty subset of {p.core_ids})")
    ram_mb = (s.claw_ram_gb or p.ram_gb[0]) * 1024
    hugepages_cap = int(ram_mb * p.hugepages.max_fraction_of_ram)
    if s.claw_hugepages_mb is not None and s.claw_hugepages_mb > hugepages_cap:
        bad("claw_hugepages_mb", f"{s.claw_hugepages_mb} MB is more than {p.name} allows "
            f"(expected ≤ {hugepages_cap} MB, "
            f"{p.hugepages.max_fraction_of_ram:.0%} of {ram_mb} MB RAM)")
    return problems


def load_inventory(path: Path, store: ProfileStore | None = None,
                   extra_vars: dict[str, Any] | None = None) -> Inventory:
    """Parse and check an inventory; every problem found is raised together as BadInputs.

    `extra_vars` (`-e` on the command line) override every host's variables, as in Ansible.
    """
    store = store or ProfileStore()
    if path.suffix.lower() not in (".yml", ".yaml") and path.is_file():
        head = path.read_text(encoding="utf-8", errors="replace").lstrip()[:1]
        if head == "[":
            raise BadInput(f"{path}:1: inventory: looks like an INI inventory "
                           "(expected a YAML inventory; convert it with "
                           "`ansible-inventory -i FILE -y --list`)")
    src = load_yaml(path, "inventory")
    parser = _Parser(src)
    parser.parse()
    if not parser.problems:
        parser.side_files()
    if not parser.problems and not parser.hosts:
        parser.problem((), "inventory", "no hosts (expected at least one host under `hosts:`)")
    if parser.problems:
        raise BadInputs(parser.problems)
    _merge_vars(parser)
    for host in parser.hosts.values():
        for key, value in (extra_vars or {}).items():
            host.vars[key], host.var_origins[key] = value, Origin(Path("-e"), 1)
    problems = [line for host in parser.hosts.values() for line in _check_host(host, store)]
    if problems:
        raise BadInputs(problems)
    groups = {g.name: sorted(g.hosts) for g in parser.groups.values()}
    return Inventory(path=path, hosts=parser.hosts, groups=groups)
