"""Model releases through the fleet rollout machinery, on two engine devices running the runtime
container with a tiny model: a second model (another seed) goes out and is served; a model the
controller can open but the server cannot serve (no tokenizer, as an export without one) is
rolled back by the canary to the model before; `claw fleet rollback --rollout` undoes a model
release; a file that is not a GGUF is refused before anything starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from provision.fleet import history
from tests.conftest import CLAW, dexec
from tests.fleet_images import release_fleet
from tests.serve_model import tiny_chat_gguf

pytestmark = pytest.mark.integration

FLEET = f"mroll{os.getpid() % 100000}"
PREFIX = f"claw-mroll-{os.getpid()}"
MODEL_DIR = "/var/lib/clawforge/models"


def fleet(*args: str) -> tuple[int, str, str]:
    done = subprocess.run([str(CLAW), "fleet", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "250"}, timeout=900)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.returncode, done.stdout, done.stderr


def rollout(inventory: Path, *args: str) -> tuple[int, dict]:
    code, out, err = fleet("rollout", "-i", str(inventory), "--json", "--batch", "100%", *args)
    assert out.strip().startswith("{"), out[-2000:] + err[-3000:]
    return code, json.loads(out)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def version(path: Path) -> str:
    return f"{path.name}@{sha256(path)[:12]}"


def complete(port: int) -> str:
    name = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()["model"]
    answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                        json={"model": name, "prompt": "Hello", "max_tokens": 6,
                              "temperature": 0})
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] > 0
    return answer.json()["choices"][0]["text"]


def served(name: str) -> str:
    """The sha256 of the file the device's runtime container serves: the release's model (an
    argument of the container), else runtime.yml's."""
    env = dexec(name, "cat /var/lib/clawforge/release/runtime.env")
    path = dict(line.split("=", 1) for line in env.splitlines()).get("CLAW_RUNTIME_MODEL")
    args = json.loads(dexec(name, "docker inspect -f '{{json .Args}}' claw-runtime"))
    if path:
        assert args[-1] == path, args
    else:
        assert args[-1] == "/etc/clawforge/runtime.yml", args
        path = dexec(name, "sed -n 's/^model: //p' /etc/clawforge/runtime.yml")
    return dexec(name, f"sha256sum {path}").split()[0]


def status(inventory: Path) -> dict[str, dict]:
    code, out, err = fleet("status", "-i", str(inventory), "--json")
    assert code == 0, out[-2000:] + err[-2000:]
    return {r["device"]: r for r in json.loads(out)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two engine devices on image v1 serving model A; model B (another seed) and a model
    without a tokenizer, both GGUF files the controller opens."""
    from gguf import GGMLQuantizationType

    from runtime.convert import convert

    work = tmp_path_factory.mktemp("mroll")
    first = tiny_chat_gguf(tmp_path_factory.mktemp("mroll-a"))
    second_dir = tmp_path_factory.mktemp("mroll-b")
    second = Path(tiny_chat_gguf(second_dir, seed=11).rename(second_dir / "mroll-b.gguf"))
    broken = convert(second_dir / "hf", work / "mroll-notok.gguf", GGMLQuantizationType.Q8_0)
    with release_fleet(2, FLEET, PREFIX, work, first, {"v1": ""}) as f:
        code, result = rollout(f.inventory, "--image", f.releases["v1"])
        assert code == 0 and result["status"] == "succeeded", result
        yield {"inventory": f.inventory, "names": f.names, "ports": f.ports,
               "first": work / "chat.gguf", "second": second, "broken": broken}


def test_a_model_release_reaches_every_device_and_is_served(setup):
    inv, names, first, second = (setup[k] for k in ("inventory", "names", "first", "second"))
    before = {n: complete(setup["ports"][n]) for n in names}
    assert {served(n) for n in names} == {sha256(first)}

    code, result = rollout(inv, "--model", str(second))
    assert code == 0 and result["status"] == "succeeded", result
    assert {(d["from_image"], d["to_image"], d["outcome"], d["delivery"])
            for d in result["devices"]} == {(version(first), version(second), "ok", "copy")}
    for n in names:
        assert served(n) == sha256(second)
        kept = dexec(n, f"ls {MODEL_DIR}").split()
        assert f"mroll-b-{sha256(second)[:12]}.gguf" in kept and "chat.gguf" in kept
        assert complete(setup["ports"][n]) != before[n]  # another model answers
    rows = status(inv)
    assert {(r["model"], r["previous_model"], r["health"]) for r in rows.values()} == {
        (version(second), version(first), "ok")}

    code, result = rollout(inv, "--model", str(second))  # already there: nothing changes
    assert code == 0 and {d["outcome"] for d in result["devices"]} == {"current"}


def test_a_model_the_device_cannot_serve_is_rolled_back_by_the_canary(setup):
    inv, names, second = setup["inventory"], setup["names"], setup["second"]
    code, result = rollout(inv, "--model", str(setup["broken"]), "--health-timeout", "60")
    assert code == 1 and result["status"] == "halted", result
    rows = {d["device"]: d for d in result["devices"]}
    canary, other = rows[names[0]], rows[names[1]]
    assert canary["outcome"] == "rolled_back", canary
    assert "tokenizer.ggml.model is missing" in canary["error"], canary  # the server's words
    assert f"rolled back to {version(second)} (healthy)" in canary["error"]
    assert other["outcome"] == "skipped", other
    for n in names:  # both serve the model before, answering
        assert served(n) == sha256(second)
        complete(setup["ports"][n])
    rows = status(inv)
    assert {(r["model"], r["pending_model"]) for r in rows.values()} == {(version(second), "")}
    state = json.loads(dexec(names[0], "cat /var/lib/clawforge/release/state.json"))
    assert state["last_failed"]["model_version"] == version(setup["broken"])


def test_rollback_undoes_a_model_release(setup):
    inv, names, first, second = (setup[k] for k in ("inventory", "names", "first", "second"))
    release = next(r for r in history.rollouts(limit=50)
                   if r["image"] == version(second)
                   and {d["outcome"] for d in r["devices"]} == {"ok"})  # not the no-op one
    code, out, err = fleet("rollback", "-i", str(inv), "--rollout", release["id"], "--json")
    assert code == 0, out[-2000:] + err[-2000:]
    assert {(d["to_image"], d["outcome"]) for d in json.loads(out)["devices"]} == {
        (version(first), "ok")}
    for n in names:
        assert served(n) == sha256(first)
        complete(setup["ports"][n])
    rows = status(inv)
    assert {(r["model"], r["previous_model"]) for r in rows.values()} == {
        (version(first), version(second))}


def test_a_file_that_is_not_a_gguf_is_refused_before_anything_starts(setup, tmp_path):
    bad = tmp_path / "mroll-notes.gguf"
    bad.write_text("these are notes, not a model\n" * 4)
    before = len(history.rollouts(limit=1000))
    code, _, err = fleet("rollout", "-i", str(setup["inventory"]), "--model", str(bad))
    assert code == 2 and f"--model {bad}: not a GGUF file" in err, err
    assert len(history.rollouts(limit=1000)) == before
