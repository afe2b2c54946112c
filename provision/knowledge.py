"""The doctor's knowledge base: known faults kept as data, matched against observed facts.

Each fault in `provision/data/faults.yml` names a symptom, its likely cause and the fix, and a
`when` condition over facts (observations such as `docker.reachable` or `zram.available`).
Facts are gathered elsewhere (controller probes, a script run on devices through Ansible), so
adding a fault is a data change, and a fault whose facts were not observed is reported `n/a`
rather than guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from provision.errors import BadInputs
from provision.validation import validation_lines
from provision.yamlsource import load_yaml

Facts = dict[str, Any]
SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


class Fault(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    scope: Literal["controller", "device"]
    severity: Literal["error", "warning", "info"]
    affects: list[str] = Field(min_length=1, description="jobs this fault breaks or slows")
    symptom: str
    cause: str
    fix: str
    when: dict[str, Any] = Field(description="condition over facts; see `matches`")
    detail: str | None = Field(None, description="observed facts to show, e.g. '{docker.error}'")


class _Missing(Exception):
    """A fact the condition needs was not observed."""


def _fact(facts: Facts, name: str) -> Any:
    if name not in facts:
        raise _Missing(name)
    return facts[name]


def _test(cond: dict[str, Any], facts: Facts) -> bool:
    if "all" in cond:
        return all(_test(c, facts) for c in cond["all"])
    if "any" in cond:
        # An `any` is true if one observed branch is true, even when another branch's facts
        # are missing; it is unknown only when no branch could be decided true.
        missing = None
        for c in cond["any"]:
            try:
                if _test(c, facts):
                    return True
            except _Missing as exc:
                missing = exc
        if missing:
            raise missing
        return False
    if "not" in cond:
        return not _test(cond["not"], facts)
    value = _fact(facts, cond["fact"])
    ops = {
        "is": lambda v, x: v == x,
        "in": lambda v, x: v in x,
        "lt": lambda v, x: v is not None and v < x,
        "gt": lambda v, x: v is not None and v > x,
        "contains": lambda v, x: x in (v or []),
        "not_contains": lambda v, x: x not in (v or []),
    }
    (op,) = (k for k in cond if k != "fact")
    return bool(ops[op](value, cond[op]))


CONDITION_OPS = {"is", "in", "lt", "gt", "contains", "not_contains"}


def _check_condition(cond: Any, where: str) -> list[str]:
    if not isinstance(cond, dict):
        return [f"{where}: expected a mapping (fact/op, all, any or not)"]
    if "all" in cond or "any" in cond:
        key = "all" if "all" in cond else "any"
        if len(cond) != 1 or not isinstance(cond[key], list) or not cond[key]:
            return [f"{where}: {key} must be the only key and hold a non-empty list"]
        return [problem for i, c in enumerate(cond[key])
                for problem in _check_condition(c, f"{where}.{key}[{i}]")]
    if "not" in cond:
        return _check_condition(cond["not"], f"{where}.not") if len(cond) == 1 else [
            f"{where}: not must be the only key"]
    ops = set(cond) - {"fact"}
    if "fact" not in cond or len(ops) != 1 or not ops <= CONDITION_OPS:
        return [f"{where}: expected `fact:` and one of {sorted(CONDITION_OPS)}"]
    return []


@dataclass
class Finding:
    fault: Fault
    status: Literal["fault", "ok", "n/a"]
    host: str
    detail: str = ""

    def record(self) -> dict[str, Any]:
        f = self.fault
        return {"id": f.id, "host": self.host, "status": self.status, "severity": f.severity,
                "affects": f.affects, "symptom": f.symptom, "cause": f.cause, "fix": f.fix,
                "detail": self.detail}


def _render_detail(template: str | None, facts: Facts) -> str:
    if not template:
        return ""
    out = template
    for name, value in facts.items():
        out = out.replace("{" + name + "}", str(value))
    return out


def evaluate(faults: list[Fault], facts: Facts, host: str) -> list[Finding]:
    findings = []
    for fault in faults:
        try:
            hit = _test(fault.when, facts)
        except _Missing as exc:
            findings.append(Finding(fault, "n/a", host, f"not observed: {exc}"))
            continue
        detail = _render_detail(fault.detail, facts) if hit else ""
        findings.append(Finding(fault, "fault" if hit else "ok", host, detail))
    return findings


def load_faults(path: Path | None = None) -> list[Fault]:
    """Load and validate the knowledge base; a broken entry is reported with its line."""
    path = path or Path(str(resources.files("provision.data") / "faults.yml"))
    src = load_yaml(path, "knowledge base")
    try:
        faults = TypeAdapter(list[Fault]).validate_python(src.data)
    except ValidationError as exc:
        raise BadInputs(validation_lines(src, exc)) from None
    problems = []
    seen: set[str] = set()
    for i, fault in enumerate(faults):
        problems += [f"{src.where((i, 'when'))}: {p}" for p in
                     _check_condition(fault.when, f"{fault.id}.when")]
        if fault.id in seen:
            problems.append(f"{src.where((i, 'id'))}: id: duplicate fault {fault.id!r}")
        seen.add(fault.id)
    if problems:
        raise BadInputs(problems)
    return faults
