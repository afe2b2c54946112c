"""The doctor's knowledge base: valid data, real conditions, and facts that really exist."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from provision.ansible import playbooks_dir
from provision.doctor import derive_device_facts
from provision.facts import controller_facts
from provision.knowledge import evaluate, load_faults

pytestmark = pytest.mark.unit


def _facts_named(cond):
    if "all" in cond or "any" in cond:
        return {f for c in cond.get("all", cond.get("any")) for f in _facts_named(c)}
    if "not" in cond:
        return _facts_named(cond["not"])
    return {cond["fact"]}


def test_knowledge_base_has_enough_real_faults():
    faults = load_faults()
    assert len(faults) >= 15
    assert {f.scope for f in faults} == {"controller", "device"}
    for fault in faults:
        assert fault.symptom and fault.cause and fault.fix


def test_every_fact_the_knowledge_base_reads_is_produced_by_a_probe():
    """A condition on a misspelt fact would never fire: check names against real probes."""
    script = playbooks_dir() / "files" / "device_facts.py"
    device = json.loads(subprocess.run([sys.executable, str(script)], capture_output=True,
                                       text=True, check=True).stdout)
    produced = set(controller_facts()) | set(derive_device_facts(device, 8))
    produced |= {"ansible.unreachable", "ansible.failed", "ansible.message"}
    # Facts a probe records only where the tool exists (no timedatectl in a container,
    # pyopencl's platform facts only when pyopencl imports).
    produced |= {"time.synchronized", "opencl.platforms", "opencl.gpu_devices",
                 "opencl.devices", "opencl.error", "hugepages.short",
                 "memory.short_of_inventory", "docker.reachable", "docker.error"}
    for fault in load_faults():
        unknown = _facts_named(fault.when) - produced
        assert not unknown, f"{fault.id} reads facts no probe produces: {unknown}"


def test_conditions_fire_and_stay_quiet():
    faults = {f.id: f for f in load_faults()}
    broken = evaluate([faults["docker-engine-unreachable"]],
                      {"docker.dockerd_installed": True, "docker.reachable": False,
                       "docker.host": "unix:///x.sock", "docker.error": "refused"}, "c")
    assert broken[0].status == "fault" and broken[0].detail == "unix:///x.sock: refused"
    fine = evaluate([faults["docker-engine-unreachable"]],
                    {"docker.dockerd_installed": True, "docker.reachable": True}, "c")
    assert fine[0].status == "ok"
    unknown = evaluate([faults["zram-module-absent"]], {}, "dev")
    assert unknown[0].status == "n/a"
    hot = evaluate([faults["thermal-throttling"]], {"thermal.max_c": 91.0}, "dev")
    assert hot[0].status == "fault"  # `any` decides on the one fact it has
    panthor = {"opencl.mali_blob": True, "kernel.module.panthor": True,
               "kernel.module.mali_kbase": False}
    assert evaluate([faults["mali-blob-under-panthor"]], panthor, "d")[0].status == "fault"


def test_malformed_knowledge_base_is_reported_with_its_line(tmp_path, capsys):
    from provision.errors import BadInputs

    path = tmp_path / "faults.yml"
    path.write_text(textwrap.dedent("""\
        - id: x
          scope: controller
          severity: fatal
          affects: [a]
          symptom: s
          cause: c
          fix: f
          when: {fact: a, is: 1}
    """))
    with pytest.raises(BadInputs) as exc:
        load_faults(path)
    assert exc.value.problems[0] == (f"{path}:3: [0].severity: 'fatal' is not valid "
                                      "(expected 'error', 'warning' or 'info')")
