"""The claw_runtime role on an emulated device: the runtime installed from the ClawForge wheel,
run by systemd as its own account, answering /health and a completion on the device's port.

The device shares this machine's network, so the test talks to the service directly on the
port the inventory gave the device (claw_runtime_port).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import httpx
import pytest
import yaml

from provision import devices
from tests.conftest import claw_subprocess, dexec
from tests.serve_model import tiny_chat_gguf

pytestmark = pytest.mark.integration

FLEET = f"rt{os.getpid()}"


def provision_runtime(inventory) -> dict:
    result = claw_subprocess("provision", "-i", str(inventory), "--tags", "claw_runtime",
                             "--json")
    assert result.code == 0, result.out[-3000:] + result.err[-2000:]
    assert "Traceback" not in result.err
    [host] = json.loads(result.out)["hosts"]
    return host


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runtime-model")
    model = shutil.copy(tiny_chat_gguf(tmp_path_factory.mktemp("tiny")), folder / "chat.gguf")
    inventory = devices.devices_up(1, "qemu-virt", "amd64", fleet=FLEET,
                                   progress=lambda _: None)
    data = yaml.safe_load(inventory.read_text())
    group = data["all"]["children"]["emulated"]
    group["vars"].update({"claw_runtime_model": str(model), "claw_runtime_backend": "numpy"})
    inventory.write_text(yaml.safe_dump(data))
    [name] = group["hosts"]
    yield inventory, name, group["hosts"][name]["claw_runtime_port"], model
    devices.devices_down(fleet=FLEET)


def started_at(name: str) -> str:
    return dexec(name, "systemctl show -p ExecMainStartTimestampMonotonic --value claw-runtime")


def test_service_serves_the_model_and_a_rerun_changes_nothing(device):
    inventory, name, port, _ = device
    first = provision_runtime(inventory)
    assert first["status"] == "ok" and first["changed"] > 0
    assert dexec(name, "systemctl is-active claw-runtime") == "active"
    assert dexec(name, "systemctl is-enabled claw-runtime") == "enabled"
    assert dexec(name, "systemctl show -p User --value claw-runtime") == "claw-runtime"
    config = yaml.safe_load(dexec(name, "cat /etc/clawforge/runtime.yml"))
    assert config == {"model": "/var/lib/clawforge/models/chat.gguf", "host": "127.0.0.1",
                      "port": port, "backend": "numpy"}
    health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                        json={"model": "chat", "prompt": "Hello", "max_tokens": 4,
                              "temperature": 0})
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] >= 1
    # Only the `runtime` extra is on the device: chat templates must render with what it brings.
    chat = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                      json={"model": "chat", "max_tokens": 4, "temperature": 0,
                            "messages": [{"role": "user", "content": "Hello"}]})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["role"] == "assistant"
    before = started_at(name)
    second = provision_runtime(inventory)
    assert second["changed"] == 0
    assert started_at(name) == before  # nothing changed, so no restart


def test_new_model_restarts_the_service(device, tmp_path):
    inventory, name, port, model = device
    provision_runtime(inventory)
    before = started_at(name)
    shutil.copy(tiny_chat_gguf(tmp_path, seed=11), model)  # same name, other weights
    host = provision_runtime(inventory)
    assert host["changed"] > 0
    assert started_at(name) != before
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    sha_device = dexec(name, "sha256sum /var/lib/clawforge/models/chat.gguf").split()[0]
    assert sha_device == hashlib.sha256(model.read_bytes()).hexdigest()


def test_missing_model_is_bad_input_before_anything_runs(device, tmp_path):
    inventory, *_ = device
    data = yaml.safe_load(inventory.read_text())
    data["all"]["children"]["emulated"]["vars"]["claw_runtime_model"] = "/nonexistent/m.gguf"
    bad = tmp_path / "inventory.yml"
    bad.write_text(yaml.safe_dump(data))
    result = claw_subprocess("provision", "-i", str(bad))
    assert result.code == 2
    assert "claw_runtime_model: /nonexistent/m.gguf is not a file" in result.err
    assert "Traceback" not in result.err
