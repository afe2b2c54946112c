"""Malformed inventories and device profiles: one line per problem, `FILE:LINE: field: …`, exit 2.

Every input is written with `textwrap.dedent` so its line numbers can be read off the test. The
CLI runs in-process through its real error boundary (`provision.cli.main`, the `claw` fixture of
tests/conftest.py); two tests run the installed `claw` to show no traceback reaches a user.
Cases that expose a defect in the project are kept as strict xfails with the reason.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from provision.errors import BadInputs
from provision.inventory import load_inventory
from tests.conftest import Result, claw_subprocess

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path, monkeypatch):
    """User profiles come from tmp_path/clawforge/profiles, never from the real home."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def profile(tmp_path: Path, name: str, text: str) -> Path:
    """A user profile, `$XDG_CONFIG_HOME/clawforge/profiles/NAME.yml`."""
    return write(tmp_path, f"clawforge/profiles/{name}.yml", text)


def errors(result: Result) -> list[str]:
    """The error lines of a bad-input run, after checking the exit code and the absent traceback."""
    assert result.code == 2, (result.code, result.out, result.err)
    assert "Traceback" not in result.out + result.err
    lines = result.err.strip().splitlines()
    assert lines, "no error printed"
    for line in lines:
        assert line.startswith("error: "), line
    return [line.removeprefix("error: ") for line in lines]


def assert_bad(result: Result, path: Path, line: int | None, field: str | None,
               *expected: str) -> str:
    """Exactly one error line: `PATH:LINE: FIELD: …` holding every `expected` fragment."""
    [message] = errors(result)
    prefix = f"{path}:{line}: " if line is not None else f"{path}: "
    if field is not None:
        prefix += f"{field}: "
    assert message.startswith(prefix), f"{message!r} does not start with {prefix!r}"
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def check_inventory(claw, path: Path) -> Result:
    return claw("inventory", "check", str(path))


# Each case: (the inventory, the line of the error, its field, what the message says).
INVENTORIES = {
    "yaml_bad_indentation": ("""\
        all:
          hosts:
            h1:
              claw_profile: rk3588
             ansible_port: 22
    """, 5, "malformed YAML",
        "expected <block end>, but found '<block mapping start>'"),
    "yaml_unclosed_bracket": ("""\
        all:
          hosts:
            h1: {claw_profile: rk3588, claw_ram_gb: [4, 8}
    """, 3, "malformed YAML",
        "expected ',' or ']', but got '}'"),
    "yaml_unclosed_bracket_at_end_of_file": ("""\
        all: [1
    """, 2, "malformed YAML",
        "expected ',' or ']', but got '<stream end>'"),
    "duplicate_key": ("""\
        all:
          hosts:
            h1:
              claw_profile: rk3588
              claw_profile: rpi5
    """, 5, "all.hosts.h1.claw_profile",
        "duplicate key (first at line 4)"),
    "duplicate_host": ("""\
        all:
          hosts:
            h1: {claw_profile: rpi5}
            h1: {claw_profile: rk3588}
    """, 4, "all.hosts.h1",
        "duplicate key (first at line 3)"),
    "yaml_merge_key_is_refused": ("""\
        all:
          hosts:
            h1:
              <<: {claw_profile: rpi5}
    """, 4, None,
        "YAML merge keys (<<) are not supported here (expected plain keys)"),
    "top_level_list": ("""\
        - all
        - hosts
    """, 1, "inventory",
        "top level is a list (expected a mapping of group names, e.g. `all:`)"),
    "two_yaml_documents": ("""\
        all:
          hosts:
            h1:
              claw_profile: rpi5
        ---
        all: {}
    """, 5, "malformed YAML",
        "expected a single document"),
    "unknown_group_key": ("""\
        all:
          host:
            h1:
              claw_profile: rk3588
    """, 2, "all.host",
        "unknown field (expected hosts, children or vars)"),
    "hosts_as_list": ("""\
        all:
          hosts:
            - h1
            - h2
    """, 2, "all.hosts",
        "is a list (expected a mapping of host names)"),
    "children_as_list": ("""\
        all:
          vars:
            claw_profile: rpi5
          hosts:
            h1:
          children:
            - pis
    """, 6, "all.children",
        "is a list (expected a mapping of group names)"),
    "host_vars_as_string": ("""\
        all:
          hosts:
            h1: rk3588
    """, 3, "host 'h1'",
        "is a str (expected a mapping of variables or nothing)"),
    "invalid_variable_name": ("""\
        all:
          hosts:
            h1:
              claw_profile: rpi5
              2cores: true
    """, 5, "host h1: '2cores'",
        "invalid variable name (expected letters, digits and underscores)"),
    "no_hosts": ("""\
        all:
          vars:
            claw_profile: rpi5
    """, 1, "inventory",
        "no hosts (expected at least one host under `hosts:`)"),
    "invalid_group_name": ("""\
        all:
          children:
            rk-boards:
              hosts:
                h1:
                  claw_profile: rk3588
    """, 3, "group 'rk-boards'",
        "invalid group name (expected letters, digits and underscores, "
        "not starting with a digit)"),
    "profile_name_not_matching_pattern": ("""\
        all:
          hosts:
            h1:
              claw_profile: Rpi5
    """, 4, "h1: claw_profile",
        "'Rpi5' is not valid (expected text matching ^[a-z0-9][a-z0-9-]*$)"),
    "unknown_claw_variable_did_you_mean": ("""\
        all:
          hosts:
            h1:
              claw_profile: rk3588
              claw_ram_gbb: 16
    """, 5, "h1: claw_ram_gbb",
        "unknown ClawForge variable (did you mean claw_ram_gb?)"),
    "port_not_a_number": ("""\
        all:
          hosts:
            h1:
              claw_profile: rk3588
              ansible_port: abc
    """, 5, "h1: ansible_port",
        "'abc' is not valid (expected a valid integer)"),
    "port_out_of_range": ("""\
        all:
          hosts:
            h1:
              claw_profile: rk3588
              ansible_port: 70000
    """, 5, "h1: ansible_port",
        "70000 is not valid (expected less than or equal to 65535)"),
    "connection_not_allowed": ("""\
        all:
          hosts:
            h1:
              claw_profile: rpi5
              ansible_connection: telnet
    """, 5, "h1: ansible_connection",
        "'telnet' is not valid (expected 'ssh', 'local'"),
    "threads_as_boolean": ("""\
        all:
          hosts:
            h1:
              claw_profile: rpi5
              claw_runtime_threads: true
    """, 5, "h1: claw_runtime_threads",
        "True"),
    "ram_not_a_profile_option": ("""\
        all:
          hosts:
            h1:
              claw_profile: rk3588
              claw_ram_gb: 12
    """, 5, "h1: claw_ram_gb",
        "12 GB is not a rk3588 option (expected one of [4, 8, 16, 32])"),
    "opencl_stack_unsupported": ("""\
        all:
          hosts:
            h1:
              claw_profile: rpi5
              claw_opencl_stack: rusticl
    """, 5, "h1: claw_opencl_stack",
        "'rusticl' is not supported on rpi5 (expected one of: pocl)"),
    "threads_above_core_count": ("""\
        all:
          hosts:
            h1:
              claw_profile: rpi5
              claw_runtime_threads: 8
    """, 5, "h1: claw_runtime_threads",
        "8 exceeds rpi5's 4 cores (expected ≤ 4)"),
    "affinity_core_not_on_profile": ("""\
        all:
          hosts:
            h1:
              claw_profile: rpi5
              claw_runtime_cpu_affinity: [0, 1, 7]
    """, 5, "h1: claw_runtime_cpu_affinity",
        "cores [7] are not on rpi5 (expected a non-empty subset of [0, 1, 2, 3])"),
    "hugepages_above_cap": ("""\
        all:
          hosts:
            h1:
              claw_profile: rpi5
              claw_ram_gb: 8
              claw_hugepages_mb: 100000
    """, 6, "h1: claw_hugepages_mb",
        "100000 MB is more than rpi5 allows (expected ≤ 4096 MB, 50% of 8192 MB RAM)"),
    "profile_from_group_var_of_wrong_type": ("""\
        all:
          children:
            boards:
              vars:
                claw_profile: [rk3588]
              hosts:
                h1:
    """, 5, "h1: claw_profile",
        "a list is not valid (expected a valid string)"),
}


@pytest.mark.parametrize("case", INVENTORIES)
def test_bad_inventory_names_file_line_and_field(tmp_path, claw, case):
    text, line, field, message = INVENTORIES[case]
    path = write(tmp_path, "inv.yml", text)
    assert_bad(check_inventory(claw, path), path, line, field, message)


# --- inventories: files that cannot be read or parsed ------------------------------------------


def test_empty_file(tmp_path, claw):
    path = tmp_path / "inv.yml"
    path.write_text("")
    assert_bad(check_inventory(claw, path), path, 1, "inventory",
               "empty file (expected a mapping such as `all: {hosts: …}`)")


def test_ini_inventory(tmp_path, claw):
    path = write(tmp_path, "hosts.ini", """\
        [boards]
        rock5b-01 ansible_host=192.0.2.11
    """)
    assert_bad(check_inventory(claw, path), path, 1, "inventory",
               "looks like an INI inventory (expected a YAML inventory; convert it with "
               "`ansible-inventory -i FILE -y --list`)")


def test_missing_file(tmp_path, claw):
    path = tmp_path / "nope.yml"
    message = assert_bad(check_inventory(claw, path), path, None, None)
    assert message == f"{path}: inventory not found"


def test_directory_instead_of_file(tmp_path, claw):
    path = tmp_path / "inv.yml"
    path.mkdir()
    message = assert_bad(check_inventory(claw, path), path, None, None)
    assert message == f"{path}: is a directory (expected a YAML inventory file)"


NOT_UTF8 = b"all:\n  hosts:\n    h\xff1:\n      claw_profile: rpi5\n"  # bad byte 19, line 3


def test_not_utf8(tmp_path, claw):
    path = tmp_path / "inv.yml"
    path.write_bytes(NOT_UTF8)
    [message] = errors(check_inventory(claw, path))
    assert message.startswith(f"{path}:"), message
    assert "byte 0xff is not UTF-8 (expected UTF-8 text)" in message, message


def test_not_utf8_names_the_line(tmp_path, claw):
    path = tmp_path / "inv.yml"
    path.write_bytes(NOT_UTF8)
    assert_bad(check_inventory(claw, path), path, 3, None, "not UTF-8", "(expected")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root reads a chmod 000 file, so the permission error never happens")
def test_unreadable_file(tmp_path, claw):
    path = write(tmp_path, "inv.yml", """\
        all:
          hosts:
            h1: {claw_profile: rpi5}
    """)
    path.chmod(0)
    try:
        message = assert_bad(check_inventory(claw, path), path, None, None)
    finally:
        path.chmod(0o644)
    assert message == f"{path}: cannot read inventory: permission denied"


# --- inventories: structure ------------------------------------------------------------------


BAD_RANGE = """\
    all:
      hosts:
        dev[5:1]:
          claw_profile: rpi5
"""


def test_bad_host_range_is_found(tmp_path):
    """The parser's message is right; see the CLI test below for what the user sees."""
    path = write(tmp_path, "inv.yml", BAD_RANGE)
    with pytest.raises(BadInputs) as caught:
        load_inventory(path)
    assert caught.value.problems == [
        f"{path}:3: host 'dev[5:1]': range start is after its end (expected [lo:hi])"]


def test_bad_host_range(tmp_path, claw):
    path = write(tmp_path, "inv.yml", BAD_RANGE)
    assert_bad(check_inventory(claw, path), path, 3, "host 'dev[5:1]'",
               "range start is after its end (expected [lo:hi])")


# --- inventories: variables checked against the profile ------------------------------------


def test_host_without_profile(tmp_path, claw):
    path = write(tmp_path, "inv.yml", """\
        all:
          vars:
            ansible_user: claw
          hosts:
            h1:
              ansible_host: 192.0.2.1
    """)
    assert_bad(check_inventory(claw, path), path, 5, "h1: claw_profile",
               "missing (expected one of: ", "rk3588", "rpi5",
               "set on the host or one of its groups)")


def test_unknown_profile_did_you_mean(tmp_path, claw):
    path = write(tmp_path, "inv.yml", """\
        all:
          hosts:
            h1:
              claw_profile: rk3599
    """)
    assert_bad(check_inventory(claw, path), path, 4, "h1: claw_profile",
               "unknown profile 'rk3599' (expected one of: ", "did you mean 'rk3588'?)")


def test_bad_value_in_group_vars_file(tmp_path, claw):
    path = write(tmp_path, "inv.yml", """\
        all:
          children:
            boards:
              hosts:
                h1:
                  claw_profile: rk3588
    """)
    side = write(tmp_path, "group_vars/boards.yml", """\
        # shared by every board
        claw_ram_gb: 16
        claw_governor: turbo
    """)
    assert_bad(check_inventory(claw, path), side, 3, "h1: claw_governor",
               "'turbo' is not valid (expected 'performance', 'schedutil', 'ondemand', "
               "'conservative', 'powersave' or 'userspace'")


def test_group_vars_file_not_a_mapping(tmp_path, claw):
    path = write(tmp_path, "inv.yml", """\
        all:
          children:
            boards:
              hosts:
                h1:
                  claw_profile: rk3588
    """)
    side = write(tmp_path, "group_vars/boards.yml", """\
        - claw_ram_gb: 16
    """)
    assert_bad(check_inventory(claw, path), side, 1, "group_vars/boards.yml",
               "is a list (expected a mapping of variables)")


# --- device profiles ----------------------------------------------------------------------

# Each case: (the profile `board`, the command that reads it, the line of the error, its
# field, what the message says).
PROFILES = {
    "unknown_field": ("""\
        name: board
        extends: generic-arm64
        description: A board
        colour: red
    """, ("profiles", "check"), 4, "colour",
        "unknown field (expected one of the schema's fields)"),
    "unknown_nested_field": ("""\
        name: board
        extends: generic-arm64
        gpu:
          opencl:
            - name: pocl
              icd: pocl.icd
              colour: red
    """, ("profiles", "show", "board"), 7, "gpu.opencl[0].colour",
        "unknown field (expected one of the schema's fields"),
    "missing_nested_field": ("""\
        name: board
        extends: generic-arm64
        cpu:
          - name: cpu
            core: Cortex-A53
            cores: [0, 1, 2, 3]
    """, ("profiles", "show", "board"), 4, "cpu[0].max_mhz",
        "missing (expected a value)"),
    "wrong_type": ("""\
        name: board
        extends: generic-arm64
        cpu:
          - name: cpu
            core: Cortex-A53
            cores: [0, 1, 2, 3]
            max_mhz: fast
    """, ("profiles", "show", "board"), 7, "cpu[0].max_mhz",
        "'fast' is not valid (expected a valid integer)"),
    "literal_not_allowed": ("""\
        name: board
        extends: generic-arm64
        governor: turbo
    """, ("profiles", "check"), 3, "governor",
        "'turbo' is not valid (expected 'performance', 'schedutil'"),
    "value_out_of_range": ("""\
        name: board
        extends: generic-arm64
        os:
          boot_partition_mb: 32
    """, ("profiles", "check"), 4, "os.boot_partition_mb",
        "32 is not valid (expected greater than or equal to 64)"),
    "affinity_outside_clusters": ("""\
        name: board
        extends: generic-arm64
        runtime:
          cpu_affinity: [0, 1, 9]
    """, ("profiles", "check"), 4, "runtime.cpu_affinity",
        "cores [9] are not in any cpu cluster (expected a subset of [0, 1, 2, 3])"),
    "threads_above_cores": ("""\
        name: board
        extends: generic-arm64
        runtime:
          threads: 6
    """, ("profiles", "show", "board"), 4, "runtime.threads",
        "6 exceeds the 4 cores (expected ≤ 4)"),
    "core_in_two_clusters": ("""\
        name: board
        extends: generic-arm64
        cpu:
          - {name: little, core: Cortex-A55, cores: [0, 1, 2, 3], max_mhz: 1800}
          - {name: big, core: Cortex-A76, cores: [3, 4], max_mhz: 2400}
    """, ("profiles", "check"), 3, "cpu",
        "cores [3] appear in two clusters (expected each core id in exactly one "
        "cluster)"),
    "ram_not_ascending": ("""\
        name: board
        extends: generic-arm64
        ram_gb: [8, 4, 16]
    """, ("profiles", "check"), 3, "ram_gb",
        "[8, 4, 16] is not valid (expected sizes in ascending order without "
        "repeats)"),
    "name_differs_from_file_name": ("""\
        name: bord
        extends: generic-arm64
    """, ("profiles", "check"), 1, "name",
        "'bord' differs from the file name (expected 'board')"),
    "without_name": ("""\
        extends: generic-arm64
        description: no name here
    """, ("profiles", "check"), 1, "name",
        "missing or not a string (expected the profile's name)"),
    "top_level_list": ("""\
        - name: board
    """, ("profiles", "check"), 1, "profile",
        "expected a mapping of profile fields"),
    "duplicate_key": ("""\
        name: board
        extends: generic-arm64
        zram: {fraction_of_ram: 0.5, algorithm: zstd}
        zram: {fraction_of_ram: 0.25}
    """, ("profiles", "check"), 4, "zram",
        "duplicate key (first at line 3)"),
    "malformed_yaml": ("""\
        name: board
        extends: generic-arm64
          description: indented too far
    """, ("profiles", "check"), 3, "malformed YAML",
        "mapping values are not allowed here"),
}


@pytest.mark.parametrize("case", PROFILES)
def test_bad_profile_names_file_line_and_field(tmp_path, claw, case):
    text, command, line, field, message = PROFILES[case]
    path = profile(tmp_path, "board", text)
    assert_bad(claw(*command), path, line, field, message)


def test_profile_missing_top_level_fields(tmp_path, claw):
    path = profile(tmp_path, "board", """\
        name: board
        description: A board with no hardware described
        arch: arm64
    """)
    lines = errors(claw("profiles", "check"))
    assert f"{path}:1: soc: missing (expected a value)" in lines
    assert f"{path}:1: runtime: missing (expected a value)" in lines
    assert all(line.startswith(f"{path}:1: ") for line in lines)


def test_profile_extends_unknown(tmp_path, claw):
    path = profile(tmp_path, "board", """\
        name: board
        extends: generic-arm65
    """)
    assert_bad(claw("profiles", "show", "board"), path, 2, "extends",
               "unknown profile 'generic-arm65' (expected one of: ", "generic-arm64")


def test_profile_extends_cycle(tmp_path, claw):
    profile(tmp_path, "a", """\
        name: a
        extends: b
    """)
    b = profile(tmp_path, "b", """\
        name: b
        extends: a
    """)
    assert_bad(claw("profiles", "show", "a"), b, 2, "extends", "cycle a -> b -> a")


def test_profile_extends_cycle_check_reports_both(tmp_path, claw):
    a = profile(tmp_path, "a", """\
        name: a
        extends: b
    """)
    b = profile(tmp_path, "b", """\
        name: b
        extends: a
    """)
    assert sorted(errors(claw("profiles", "check"))) == sorted([
        f"{a}:2: extends: cycle b -> a -> b",
        f"{b}:2: extends: cycle a -> b -> a",
    ])


# --- the installed `claw`, in its own process ----------------------------------------------


def test_subprocess_bad_inventory_has_no_traceback(tmp_path):
    path = write(tmp_path, "inv.yml", """\
        all:
          hosts:
            h1:
              claw_profile: rk3599
    """)
    result = claw_subprocess("inventory", "check", str(path),
                             env={"XDG_CONFIG_HOME": str(tmp_path)})
    assert_bad(result, path, 4, "h1: claw_profile", "did you mean 'rk3588'?")
    assert result.out == ""


def test_subprocess_bad_profile_has_no_traceback(tmp_path):
    path = profile(tmp_path, "board", """\
        name: board
        extends: generic-arm64
        governor: turbo
    """)
    result = claw_subprocess("profiles", "check", env={"XDG_CONFIG_HOME": str(tmp_path)})
    assert_bad(result, path, 3, "governor", "'turbo' is not valid (expected 'performance'")
    assert result.out == ""


def test_subprocess_markup_in_a_name_has_no_traceback(tmp_path):
    path = write(tmp_path, "inv.yml", """\
        all:
          hosts:
            a[/b]: oops
    """)
    result = claw_subprocess("inventory", "check", str(path),
                             env={"XDG_CONFIG_HOME": str(tmp_path)})
    assert_bad(result, path, 3, "host 'a[/b]'",
               "is a str (expected a mapping of variables or nothing)")
