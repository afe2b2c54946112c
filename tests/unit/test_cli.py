"""The CLI's contract: every command has help with an example, and honest exit codes."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit

COMMANDS = [
    ["profiles", "list"], ["profiles", "show"], ["profiles", "check"],
    ["inventory", "check"], ["doctor"],
    ["runtime", "info"], ["runtime", "generate"], ["runtime", "convert"],
    ["runtime", "bench"], ["runtime", "tune"], ["runtime", "quantize"], ["runtime", "eval"],
    ["provision"], ["devices", "up"], ["devices", "list"], ["devices", "down"],
    ["vm", "up"], ["vm", "down"], ["vm", "list"], ["vm", "console"],
    ["runtime", "selftest"],
    ["image", "render"], ["image", "build"], ["image", "base"], ["image", "export"],
    ["image", "import"], ["image", "push"], ["image", "run-dev"], ["image", "k8s"],
    ["fleet", "rollout"], ["fleet", "rollback"], ["fleet", "status"], ["fleet", "history"],
    ["flash"], ["bmap"], ["os", "build"], ["os", "customize"],
    ["fed", "export"], ["fed", "runs"], ["fed", "run"],
]


def test_root_help_lists_every_group(claw):
    result = claw("--help")
    assert result.code == 0
    for group in ["profiles", "inventory", "doctor", "runtime", "provision", "devices", "flash",
                  "bmap", "image", "fleet", "os", "fed"]:
        assert group in result.out


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_an_example(claw, command):
    result = claw(*command, "--help")
    assert result.code == 0
    assert "Example:" in result.out and "claw " in result.out


def test_unknown_command_and_option_are_bad_input(claw):
    assert claw("frobnicate").code == 2
    assert claw("profiles", "list", "--colour").code == 2


def test_version(claw):
    result = claw("--version")
    assert result.code == 0 and result.out.startswith("claw 0.")
