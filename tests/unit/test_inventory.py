"""Inventories resolve the way Ansible resolves them, against the device profiles."""

from __future__ import annotations

import json
import textwrap

import pytest

from provision.inventory import load_inventory
from tests.conftest import REPO

pytestmark = pytest.mark.unit


def write(tmp_path, text, name="inv.yml"):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_example_fleet_resolves():
    inv = load_inventory(REPO / "examples" / "fleet.yml")
    assert sorted(inv.hosts) == ["pi5-01", "pi5-02", "qemu-01", "rock5b-01", "rock5b-02"]
    rock = inv.hosts["rock5b-02"].effective()
    assert rock["profile"] == "rk3588" and rock["ram_gb"] == 16
    assert rock["opencl_stack"] == "mali-blob"  # host override beats the profile default
    assert inv.hosts["rock5b-01"].effective()["opencl_stack"] == "rusticl"
    assert inv.hosts["qemu-01"].effective()["port"] == 2222


def test_variable_precedence_follows_ansible(tmp_path):
    path = write(tmp_path, """\
        all:
          vars: {claw_profile: generic-arm64, claw_runtime_threads: 1}
          children:
            boards:
              vars: {claw_runtime_threads: 2}
              children:
                fast:
                  vars: {claw_runtime_threads: 3}
                  hosts:
                    a: {}
                    b: {claw_runtime_threads: 4}
            other:
              hosts:
                c:
    """)
    write(tmp_path, "claw_ram_gb: 8\n", "host_vars/c.yml")
    inv = load_inventory(path)
    assert inv.hosts["a"].effective()["runtime"]["threads"] == 3  # deepest group wins
    assert inv.hosts["b"].effective()["runtime"]["threads"] == 4  # host wins
    assert inv.hosts["c"].effective()["runtime"]["threads"] == 1  # from `all`
    assert inv.hosts["c"].effective()["ram_gb"] == 8  # host_vars/ file
    assert inv.hosts["a"].groups == ["boards", "fast"]


def test_host_ranges_expand_with_padding(tmp_path):
    path = write(tmp_path, """\
        all:
          hosts:
            dev[08:11]: {claw_profile: rpi5}
    """)
    assert sorted(load_inventory(path).hosts) == ["dev08", "dev09", "dev10", "dev11"]


def test_inventory_check_cli_prints_hosts(claw):
    result = claw("inventory", "check", str(REPO / "examples" / "fleet.yml"), "--json")
    assert result.code == 0, result.err
    hosts = {h["host"]: h for h in json.loads(result.out)}
    assert hosts["pi5-01"]["profile"] == "rpi5" and hosts["pi5-01"]["ram_gb"] == 8


def test_every_problem_is_reported_at_once(tmp_path, claw):
    path = write(tmp_path, """\
        all:
          hosts:
            a: {claw_profile: rpi5, claw_ram_gb: 3}
            b: {claw_profile: rk3588, claw_opencl_stack: nvidia}
    """)
    result = claw("inventory", "check", str(path))
    assert result.code == 2
    assert f"{path}:3: a: claw_ram_gb:" in result.err
    assert f"{path}:4: b: claw_opencl_stack:" in result.err
