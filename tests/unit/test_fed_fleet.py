"""`claw fed run` without devices: its bad input (one line, exit 2, nothing recorded), the
pre-flight's judgement of a fleet, the per-round table fed from `rounds.jsonl` as it grows, and
the `fed_runs` table of the history store."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import yaml
from rich.console import Console

from provision.cli.fed_run import rounds_table
from provision.fed import fleet
from provision.fleet import history

pytestmark = pytest.mark.unit


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path / "state"


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "base.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def inventory(tmp_path: Path, n: int) -> Path:
    hosts = {f"dev{i}": {"ansible_host": "127.0.0.1", "ansible_port": 2200 + i}
             for i in range(n)}
    path = tmp_path / f"fleet{n}.yml"
    path.write_text(yaml.safe_dump({"all": {"vars": {"claw_profile": "qemu-virt"},
                                            "hosts": hosts}}))
    return path


@pytest.mark.parametrize("args,needle", [
    (["--rounds", "0"], "--rounds 0: expected at least 1"),
    (["--min-clients", "4"], "--min-clients 4: expected 1 to 3"),
    (["--data-dir", "srv/text"], "--data-dir 'srv/text': expected an absolute path"),
    (["--device-model", "m.gguf"], "--device-model 'm.gguf': expected an absolute path"),
    (["--lr", "0"], "expected positive values"),
])
def test_bad_arguments_are_one_line_and_exit_2_with_nothing_recorded(claw, tmp_path, state,
                                                                       model, args, needle):
    base = ["fed", "run", "-i", str(inventory(tmp_path, 3)), "--model", str(model),
            "--data-dir", "/srv/text", "--rounds", "2"]
    done = claw(*base, *args)
    assert done.code == 2, done.out + done.err
    assert needle in done.err and "Traceback" not in done.err
    assert len(done.err.strip().splitlines()) == 1
    assert history.fed_runs() == []


def test_a_model_that_is_not_gguf_and_secagg_over_one_device_are_refused(claw, tmp_path, state):
    text = tmp_path / "model.bin"
    text.write_bytes(b"PK\x03\x04 not a model")
    done = claw("fed", "run", "-i", str(inventory(tmp_path, 3)), "--model", str(text),
                "--data-dir", "/srv/text", "--rounds", "1")
    assert done.code == 2 and f"--model {text}: not a GGUF file" in done.err
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF" + bytes(60))
    done = claw("fed", "run", "-i", str(inventory(tmp_path, 1)), "--model", str(gguf_file),
                "--data-dir", "/srv/text", "--rounds", "1")
    assert done.code == 2 and "--secagg needs at least 2 devices" in done.err


def test_preflight_names_every_failing_device_and_why():
    sha = "a" * 64
    good = fleet.DeviceCheck("d1", True, 2, True, sha, "img", "sha256:1")
    assert good.problems(sha) == []
    assert fleet.DeviceCheck("d2", False, 0, True, sha, "img", "sha256:1").problems(sha) == [
        "data dir missing"]
    empty = fleet.DeviceCheck("d3", True, 0, True, "b" * 64, "img", "")
    assert empty.problems(sha) == [
        "data dir holds no *.txt", "model sha256 bbbbbbbbbbbb… differs from the controller's "
        "aaaaaaaaaaaa…", "image img not on the device"]
    assert fleet.DeviceCheck("d4", error="unreachable: ssh").problems(sha) == [
        "unreachable: ssh"]


def test_each_round_appears_in_the_table_as_rounds_jsonl_grows(tmp_path):
    path = tmp_path / "rounds.jsonl"
    records = [{"round": i, "clients_joined": 3, "clients_dropped": int(i == 2),
                "local_loss": 3.0 - i / 10, "eval_loss": 3.1 - i / 10, "seconds": 1.5,
                "bytes_per_client": 131072} for i in (1, 2, 3)]
    finished = threading.Event()

    def write() -> None:
        for r in records:
            time.sleep(0.2)
            with path.open("a") as f:
                f.write(json.dumps(r) + "\n")
        with path.open("a") as f:
            f.write('{"round": 4, "clients')  # a line still being written is not a round
        finished.set()

    writer = threading.Thread(target=write)
    writer.start()
    seen = list(fleet.follow_rounds(path, finished.is_set, poll_s=0.05))
    writer.join()
    assert seen == records
    console = Console(width=120, record=True)
    console.print(rounds_table("claw fed run", seen, "training"))
    text = console.export_text()
    assert "2.9000" in text and "2.8000" in text and "131,072" in text
    assert [ln.split()[1] for ln in text.splitlines() if ln.startswith("│ ")] == ["1", "2", "3"]


def test_fed_runs_are_recorded_listed_and_found_by_prefix(tmp_path, state, model):
    inv = inventory(tmp_path, 3)
    history.fed_run_start("fed-20261126-080000-ab12", inv, model, "c" * 64,
                          {"rounds": 3, "secagg": True}, tmp_path / "run")
    history.fed_run_progress("fed-20261126-080000-ab12", 2)
    history.fed_run_start("fed-20261126-090000-cd34", inv, model, "c" * 64, {"rounds": 1},
                          tmp_path / "run2")
    history.fed_run_finish("fed-20261126-090000-cd34", "refused", 0, "d2: data dir missing")
    runs = history.fed_runs()
    assert [r["id"] for r in runs] == ["fed-20261126-090000-cd34", "fed-20261126-080000-ab12"]
    assert runs[1]["status"] == "running" and runs[1]["rounds_done"] == 2
    assert runs[1]["settings"] == {"rounds": 3, "secagg": True}
    assert runs[1]["model_sha256"] == "c" * 64 and runs[1]["inventory"] == str(inv.resolve())
    assert history.fed_run("fed-20261126-09")["error"] == "d2: data dir missing"
    with pytest.raises(Exception, match="'fed-nope' is not in the history"):
        history.fed_run("fed-nope")


def test_emulated_devices_reach_the_controller_on_loopback_and_ports_are_distinct(tmp_path):
    hosts = fleet.fleet_hosts(inventory(tmp_path, 3))
    assert fleet.server_address_for(hosts, None) == "127.0.0.1"
    assert fleet.server_address_for(hosts, "10.0.0.5") == "10.0.0.5"
    assert len(set(fleet.free_ports(5))) == 5
    images = fleet.images_for(hosts, None)
    assert set(images.values()) == {"clawforge/runtime:0.1.0-qemu-virt-arm64-numpy-fed"}
