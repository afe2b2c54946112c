"""Fleet rollouts on ten emulated devices, each with its own Docker engine.

The devices are provisioned as a user would (docker_engine and claw_runtime in container mode,
a tiny model); then real releases (the numpy-only runtime image and releases made from it) go
out through `claw fleet rollout` as a subprocess: a first install through a local registry, an
upgrade by tarball, a broken release the canary catches, a release that fails on two boards, a
device lost mid-rollout, and a controller killed mid-batch then resumed. After each, every
device runs a healthy version: `claw fleet status` asks each one for /health and the test asks
each for a completion itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from provision.fleet import history
from tests.conftest import CLAW, claw_subprocess, dexec
from tests.fleet_images import REV_B_MARKER, release_fleet
from tests.registry import local_registry
from tests.serve_model import tiny_chat_gguf

# The first test, whose time includes the module's setup (ten engine devices provisioned),
# took 13 min beside the e2e tier's QEMU (20 when it delivered the image twice): past the
# default 900 s. The others take 1-6 min each.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(2400)]

FLEET = f"ro{os.getpid() % 100000}"
N = 10
PREFIX = f"claw-fleettest-{os.getpid()}"


def fleet(*args: str, timeout: int = 1800) -> tuple[int, str, str]:
    done = subprocess.run([str(CLAW), "fleet", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "250"}, timeout=timeout)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.returncode, done.stdout, done.stderr


def rollout(inventory: Path, image: str, *args: str) -> tuple[int, dict]:
    code, out, err = fleet("rollout", "-i", str(inventory), "--image", image, "--json", *args)
    assert out.strip().startswith("{"), out[-2000:] + err[-3000:]
    return code, json.loads(out)


def status(inventory: Path) -> dict[str, dict]:
    _, out, err = fleet("status", "-i", str(inventory), "--json")
    assert out.strip().startswith("["), out[-2000:] + err[-2000:]
    rows = json.loads(out)
    return {r["device"]: r for r in rows}


def complete(port: int) -> str:
    name = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()["model"]
    answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                        json={"model": name, "prompt": "Hello", "max_tokens": 3,
                              "temperature": 0})
    assert answer.status_code == 200, answer.text
    return answer.json()["choices"][0]["text"]


def assert_fleet(setup, expected: dict[str, str]) -> dict[str, dict]:
    """Every device healthy on the image `expected` names for it, answering a completion."""
    rows = status(setup["inventory"])
    assert set(rows) == set(setup["names"])
    for name, row in rows.items():
        assert row["health"] == "ok", (name, row)
        assert row["running"] == expected[name], (name, row)
        assert row["committed"] == expected[name] and not row["pending"], (name, row)
        assert row["mem_total_mb"] > 0
    with ThreadPoolExecutor(len(rows)) as pool:  # each device answers on its own
        answers = list(pool.map(complete, [setup["ports"][name] for name in rows]))
    assert all(isinstance(text, str) for text in answers)
    return rows


def with_vars(setup, name: str, host: str | None = None, **more) -> Path:
    """A copy of the fleet's inventory with more variables for the group (or one host)."""
    data = yaml.safe_load(setup["inventory"].read_text())
    group = data["all"]["children"]["emulated"]
    (group["hosts"][host] if host else group["vars"]).update(more)
    path = setup["inventory"].with_name(f"{FLEET}-{name}.yml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Ten engine devices provisioned for the runtime container, and the releases."""
    work = tmp_path_factory.mktemp("fleet")
    model = tiny_chat_gguf(tmp_path_factory.mktemp("tiny"))
    versions = {v: "rev-b" if v == "v3" else "" for v in ("v1", "v2", "v3", "v4", "v5")}
    with release_fleet(N, FLEET, PREFIX, work, model, {**versions, "bad": "always"}) as fleet:
        # Idempotent even with no release yet (the service waits for its first image). One
        # device shows it: the ten run the same tasks, and a second run of all ten cost 3 min.
        again = claw_subprocess("provision", "-i", str(fleet.inventory), "--tags",
                                "docker_engine,claw_runtime", "--limit", fleet.names[0],
                                "--json")
        hosts = json.loads(again.out)["hosts"]
        assert [(h["host"], h["changed"]) for h in hosts] == [(fleet.names[0], 0)], \
            again.out[-2000:]
        with local_registry(work / "registry") as registry:
            yield {"inventory": fleet.inventory, "names": fleet.names, "ports": fleet.ports,
                   "releases": fleet.releases, "registry": registry, "work": work}


def test_first_install_through_a_registry_then_upgrade_by_tarball(setup):
    """The first install carries the whole image to ten engines; the tarball upgrade after it
    only the release's manifest and config, since the devices hold its layers. (The other
    order costs a second whole delivery: an engine that got its layers by `docker load` knows
    no registry digests for them, so its first pull downloads every layer again.)"""
    inv, r, names = setup["inventory"], setup["releases"], setup["names"]
    # Provisioned, no release yet: the service is installed and waits for one.
    assert dexec(names[0], "systemctl is-enabled claw-runtime") == "enabled"
    assert dexec(names[0], "systemctl is-active claw-runtime || true") != "active"
    code, result = rollout(inv, r["v1"], "--batch", "50%", "--registry", setup["registry"])
    assert code == 0, result
    assert result["status"] == "succeeded"
    rows = {d["device"]: d for d in result["devices"]}
    assert [rows[n]["batch"] for n in names] == [0] + [1] * 5 + [2] * 4  # 1, then 50 % of 10
    assert {d["outcome"] for d in rows.values()} == {"ok"}
    assert {d["delivery"] for d in rows.values()} == {"registry"}
    assert {d["from_image"] for d in rows.values()} == {""}
    assert_fleet(setup, dict.fromkeys(names, r["v1"]))

    code, result = rollout(inv, r["v2"], "--batch", "50%")
    assert code == 0 and result["status"] == "succeeded", result
    assert {(d["from_image"], d["to_image"], d["outcome"], d["delivery"])
            for d in result["devices"]} == {(r["v1"], r["v2"], "ok", "tar")}
    rows = assert_fleet(setup, dict.fromkeys(names, r["v2"]))
    assert {row["previous"] for row in rows.values()} == {r["v1"]}
    # The old version stays on the device until the next release is committed.
    assert dexec(names[3], f"docker image inspect -f ok {r['v1']}") == "ok"

    # The same release again changes nothing: every device is already on it.
    code, result = rollout(inv, r["v2"], "--batch", "100%")
    assert code == 0 and {d["outcome"] for d in result["devices"]} == {"current"}


def test_a_broken_release_is_stopped_by_the_canary(setup):
    inv, r, names = setup["inventory"], setup["releases"], setup["names"]
    code, result = rollout(inv, r["bad"], "--batch", "50%", "--max-fail", "10%")
    assert code == 1 and result["status"] == "halted"
    rows = {d["device"]: d for d in result["devices"]}
    canary = rows[names[0]]
    assert canary["outcome"] == "rolled_back" and canary["batch"] == 0
    assert "no healthy runtime" in canary["error"] and canary["from_image"] == r["v2"]
    for name in names[1:]:  # nothing else was touched: not even the image was delivered
        assert rows[name]["outcome"] == "skipped" and rows[name]["phase"] == "waiting"
        assert "not started" in rows[name]["error"]
    assert dexec(names[1], f"docker image inspect {r['bad']} >/dev/null 2>&1 || echo absent") \
        == "absent"
    assert_fleet(setup, dict.fromkeys(names, r["v2"]))
    state = json.loads(dexec(names[0], "cat /var/lib/clawforge/release/state.json"))
    assert state["last_failed"]["image"] == r["bad"]
    code, out, _ = fleet("history", result["rollout_id"])
    assert code == 0 and "halted" in out and "rolled_back" in out


def test_a_release_that_fails_on_two_boards_rolls_back_only_those(setup):
    inv, r, names = setup["inventory"], setup["releases"], setup["names"]
    rev_b = {names[4], names[8]}
    for name in rev_b:
        dexec(name, f"touch {REV_B_MARKER}")
    try:
        code, result = rollout(inv, r["v3"], "--batch", "100%", "--max-fail", "30%",
                               "--registry", setup["registry"])
    finally:
        for name in rev_b:
            dexec(name, f"rm -f {REV_B_MARKER}")
    assert code == 1 and result["status"] == "failed"
    rows = {d["device"]: d for d in result["devices"]}
    assert {n for n, d in rows.items() if d["outcome"] == "rolled_back"} == rev_b
    assert {n for n, d in rows.items() if d["outcome"] == "ok"} == set(names) - rev_b
    for name in rev_b:
        assert rows[name]["from_image"] == r["v2"] and rows[name]["phase"] == "rolled_back"
        assert "no healthy runtime" in rows[name]["error"]
    assert result["error"] == "2 of 10 device(s) did not take the release"
    assert_fleet(setup, {n: r["v2"] if n in rev_b else r["v3"] for n in names})
    # The two go to v3's successor with everyone else.
    code, result = rollout(inv, r["v4"], "--canary", "0", "--batch", "100%")
    assert code == 0, result
    assert_fleet(setup, dict.fromkeys(names, r["v4"]))


def test_past_the_budget_the_batch_is_rolled_back_and_later_devices_untouched(setup):
    inv, r, names = setup["inventory"], setup["releases"], setup["names"]
    rev_b = {names[4], names[8]}
    for name in rev_b:
        dexec(name, f"touch {REV_B_MARKER}")
    try:  # canary, then 3 per batch: the batch with names[4] has 1 of 3 failing > 10 %
        code, result = rollout(inv, r["v3"], "--canary", "1", "--batch", "3",
                               "--max-fail", "10%")
    finally:
        for name in rev_b:
            dexec(name, f"rm -f {REV_B_MARKER}")
    assert code == 1 and result["status"] == "halted", result
    rows = {d["device"]: d for d in result["devices"]}
    assert rows[names[0]]["outcome"] == "ok" and rows[names[1]]["outcome"] == "ok"  # batches
    assert rows[names[2]]["outcome"] == "ok" and rows[names[3]]["outcome"] == "ok"  # 0 and 1
    batch = [names[4], names[5], names[6]]
    assert {rows[n]["batch"] for n in batch} == {2}
    assert {rows[n]["outcome"] for n in batch} == {"rolled_back"}
    assert "batch rolled back" in rows[names[5]]["error"]
    for name in names[7:]:
        assert rows[name]["outcome"] == "skipped" and rows[name]["phase"] == "waiting"
    assert result["error"] == "the failure budget was exceeded"
    record = history.get(result["rollout_id"])
    assert record["stopped_at"] == f"batch 2: 1 of 3 failed ({names[4]})"
    expected = dict.fromkeys(names, r["v4"]) | dict.fromkeys(names[:4], r["v3"])
    assert_fleet(setup, expected)


def test_a_device_lost_mid_rollout_is_left_healthy_and_finished_on_resume(setup):
    inv, r, names = setup["inventory"], setup["releases"], setup["names"]
    lost = names[6]
    # The lost device's own hook kills its sshd just before its download: a real loss of
    # contact in the middle of its rollout (the hook runs only once).
    hooked = with_vars(setup, "lost", host=lost, claw_rollout_hooks={"before_download": [
        "[ -e /run/claw-lost-once ] || { touch /run/claw-lost-once; "
        "systemctl stop ssh.service; pkill -KILL sshd; }"]})
    code, result = rollout(hooked, r["v5"], "--canary", "1", "--batch", "100%",
                           "--max-fail", "20%")
    assert code == 1 and result["status"] == "failed", result
    rows = {d["device"]: d for d in result["devices"]}
    assert rows[lost]["outcome"] == "unreachable", rows[lost]
    assert {n for n, d in rows.items() if d["outcome"] == "ok"} == set(names) - {lost}
    dexec(lost, "systemctl start ssh.service")
    expected = {n: r["v5"] for n in names} | {lost: r["v4"]}
    assert_fleet(setup, expected)  # it kept serving its old version all along
    code, result = rollout(inv, r["v5"], "--resume", result["rollout_id"])
    assert code == 0 and result["status"] == "succeeded", result
    assert_fleet(setup, dict.fromkeys(names, r["v5"]))


def test_a_killed_controller_leaves_a_record_and_the_rollout_resumes(setup):
    r, names = setup["releases"], setup["names"]
    first = names[:5]
    # The first batch's devices stop before their commit, long enough to kill the controller.
    slow = with_vars(setup, "slow", claw_rollout_hooks={"before_commit": [
        "if [ -e /run/claw-slow ]; then rm /run/claw-slow; sleep 60; fi"]})
    for name in first:
        dexec(name, "touch /run/claw-slow")
    proc = subprocess.Popen([str(CLAW), "fleet", "rollout", "-i", str(slow), "--image", r["v4"],
                             "--canary", "0", "--batch", "50%", "--json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    rollout_id = ""
    while time.monotonic() < deadline:  # wait until the first batch is waiting to commit
        runs = [x for x in history.rollouts(limit=5) if x["image"] == r["v4"]
                and x["status"] == "running"]
        if runs and sum(d["phase"] == "healthy" for d in runs[0]["devices"]) >= 5:
            rollout_id = runs[0]["id"]
            break
        time.sleep(1)
    assert rollout_id, "the first batch never got to its commit"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # ansible-playbook ends with its controller (it runs in a session of its own, under a pty
    # that ignores SIGHUP: without the guard it went on alone).
    deadline = time.monotonic() + 20
    while subprocess.run(["pgrep", "-f", f"runs/{rollout_id}/"]).returncode == 0:
        assert time.monotonic() < deadline, "ansible-playbook outlived its controller"
        time.sleep(0.5)
    record = history.get(rollout_id)
    assert record["status"] == "interrupted"
    assert record["stopped_at"] == "batch 0: " + ", ".join(f"{n} healthy" for n in first)
    for name in first:  # switched but uncommitted: the guard timer will undo it if nobody does
        state = json.loads(dexec(name, "cat /var/lib/clawforge/release/state.json"))
        assert state["pending"]["image"] == r["v4"] and state["committed"]["image"] == r["v5"]
        assert dexec(name, "systemctl is-active claw-release-guard.timer") == "active"
    phases = {d["device"]: d["phase"] for d in record["devices"]}
    assert {phases[n] for n in names[5:]} == {"waiting"}
    # Undo it first: the switched devices go back to what they ran before it, committed.
    code, out, err = fleet("rollback", "-i", str(slow), "--rollout", rollout_id, "--json")
    assert code == 0, out[-2000:] + err[-2000:]
    undone = json.loads(out)["devices"]
    assert sorted(d["device"] for d in undone) == sorted(first)
    assert {d["to_image"] for d in undone} == {r["v5"]}
    assert_fleet(setup, dict.fromkeys(names, r["v5"]))
    for name in first:
        assert dexec(name, "systemctl is-active claw-release-guard.timer || true") != "active"
    # ... then finish it after all.
    code, result = rollout(slow, r["v4"], "--resume", rollout_id)
    assert code == 0 and result["status"] == "succeeded", result
    assert result["rollout_id"] == rollout_id
    assert "resumed" in history.get(rollout_id)["notes"]
    assert_fleet(setup, dict.fromkeys(names, r["v4"]))


def test_rollback_takes_each_device_to_its_previous_release(setup):
    inv, r, names = setup["inventory"], setup["releases"], setup["names"]
    code, out, err = fleet("rollback", "-i", str(inv), "--json")
    assert code == 0, out[-2000:] + err[-2000:]
    result = json.loads(out)
    assert {(d["to_image"], d["outcome"]) for d in result["devices"]} == {(r["v5"], "ok")}
    rows = assert_fleet(setup, dict.fromkeys(names, r["v5"]))
    assert {row["previous"] for row in rows.values()} == {r["v4"]}
    code, out, err = fleet("rollback", "-i", str(inv), "--to", r["v1"], "--json")
    assert code == 1  # v1 was pruned from the devices: it has to be rolled out again
    assert "is not on this device" in out


def test_bad_rollout_input_is_refused_before_anything_runs(setup):
    inv = setup["inventory"]
    before = len(history.rollouts(limit=1000))
    code, _, err = fleet("rollout", "-i", str(inv), "--image", f"{PREFIX}/runtime:nope")
    assert code == 2 and "no such image on this machine" in err
    code, _, err = fleet("rollout", "-i", str(inv), "--image", setup["releases"]["v1"],
                         "--batch", "0")
    assert code == 2 and "--batch '0' is not valid" in err
    code, _, err = fleet("rollout", "-i", str(inv), "--image", setup["releases"]["v1"],
                         "--max-fail", "200%")
    assert code == 2 and "--max-fail '200%' is not valid" in err
    assert len(history.rollouts(limit=1000)) == before
