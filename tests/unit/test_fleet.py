"""Fleet rollouts without devices: batch plans as Ansible makes them, bad settings refused before
anything runs, and the history's record of a rollout whose controller died."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from provision.fleet import history
from provision.fleet.plan import parse_batch, parse_max_fail, plan_batches

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


HOSTS = [f"d{i}" for i in range(1, 11)]


@pytest.mark.parametrize("serial,sizes", [
    ([1, "25%"], [1, 2, 2, 2, 2, 1]),      # 25 % of 10 is 2 (Ansible rounds down)
    ([1, "100%"], [1, 9]),
    (["30%"], [3, 3, 3, 1]),
    ([2, "5%"], [2] + [1] * 8),             # at least one device per batch
    ([1, "4"], [1, 4, 4, 1]),
])
def test_batches_follow_ansible_serial(serial, sizes):
    batches = plan_batches(HOSTS, serial)
    assert [len(b) for b in batches] == sizes
    assert [h for b in batches for h in b] == HOSTS


def test_plan_matches_what_ansible_itself_runs(tmp_path):
    """The plan shown by --dry-run is the one ansible-playbook makes (local hosts)."""
    import sys

    inv = tmp_path / "inv.yml"
    inv.write_text(yaml.safe_dump({"all": {"hosts": {h: None for h in HOSTS}, "vars": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable}}},
        sort_keys=False))  # Ansible batches in inventory order
    play = tmp_path / "play.yml"
    play.write_text(yaml.safe_dump([{"hosts": "all", "gather_facts": False,
                                     "serial": "{{ s }}", "tasks": [{"debug": {"msg": "x"}}]}]))
    serial = [1, "30%"]
    bin_dir = os.path.dirname(sys.executable)
    done = subprocess.run([f"{bin_dir}/ansible-playbook", "-i", str(inv), str(play), "-e",
                           json.dumps({"s": serial})], capture_output=True, text=True,
                          env={**os.environ, "ANSIBLE_NOCOLOR": "1"}, timeout=120)
    assert done.returncode == 0, done.stdout[-500:]
    seen: list[list[str]] = []
    for line in done.stdout.splitlines():
        if line.startswith("PLAY [all]"):
            seen.append([])
        elif line.startswith("ok: ["):
            seen[-1].append(line.split("[")[1].split("]")[0])
    assert [sorted(b) for b in seen] == [sorted(b) for b in plan_batches(HOSTS, serial)]


@pytest.mark.parametrize("value,expected", [("25%", "25%"), ("3", "3"), (" 100% ", "100%")])
def test_batch_values(value, expected):
    assert parse_batch(value) == expected


@pytest.mark.parametrize("value", ["0", "0%", "101%", "-1", "x", "25%%", ""])
def test_bad_batch_values_are_refused(value, claw, tmp_path):
    result = claw("fleet", "rollout", "-i", str(tmp_path / "none.yml"), "--image", "x:1",
                  "--batch", value)
    assert result.code == 2 and "--batch" in result.err and "expected" in result.err
    assert "Traceback" not in result.err


@pytest.mark.parametrize("value,expected", [("10%", 10), ("0", 0), ("100%", 100)])
def test_max_fail_values(value, expected):
    assert parse_max_fail(value) == expected


@pytest.mark.parametrize("value", ["150%", "-5%", "ten", "1.5%"])
def test_bad_max_fail_values_are_refused(value, claw, tmp_path):
    result = claw("fleet", "rollout", "-i", str(tmp_path / "none.yml"), "--image", "x:1",
                  "--max-fail", value)
    assert result.code == 2 and "--max-fail" in result.err and "0%–100%" in result.err


def test_unknown_strategy_is_refused(claw, tmp_path):
    inv = tmp_path / "fleet.yml"
    inv.write_text("all:\n  hosts:\n    a: {claw_profile: rpi5}\n")
    result = claw("fleet", "rollout", "-i", str(inv), "--image", "x:1", "--strategy", "yolo")
    assert result.code == 2 and "--strategy 'yolo'" in result.err
    assert "download-then-restart" in result.err


def test_inventory_without_the_runtime_role_is_refused(claw, tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    inv = tmp_path / "fleet.yml"
    inv.write_text(yaml.safe_dump({"all": {"hosts": {
        "a": {"claw_profile": "rpi5", "claw_runtime_model": str(model),
              "claw_runtime_install": "container"},
        "b": {"claw_profile": "rpi5"},
        "c": {"claw_profile": "rpi5", "claw_runtime_model": str(model)}}}}))
    result = claw("fleet", "rollout", "-i", str(inv), "--image", "x:1")
    assert result.code == 2
    assert "b, c: no runtime service that runs images" in result.err
    assert "claw_runtime_install: container" in result.err
    assert not history.db_path().exists()  # nothing recorded, nothing run


def test_a_dead_controller_leaves_an_interrupted_rollout_that_says_where(tmp_path):
    batches = [["d1"], ["d2", "d3"], ["d4"]]
    history.start("r1", "rollout", tmp_path / "fleet.yml", "img:2", "sha256:2", {"canary": 1},
                  batches)
    history.device_update("r1", "d1", phase="committed", outcome="ok", from_image="img:1")
    history.device_update("r1", "d2", phase="healthy", from_image="img:1")
    history.device_update("r1", "d3", phase="delivered", from_image="img:1")
    dead = subprocess.Popen(["true"])
    dead.wait()
    with history.connect() as con:  # the controller was this process, now gone
        con.execute("UPDATE rollouts SET pid=? WHERE id='r1'", (dead.pid,))
    row = history.get("r1")
    assert row["status"] == "interrupted"
    assert row["stopped_at"] == "batch 1: d2 healthy, d3 delivered"
    assert "controller stopped" in row["error"]
    assert [d["outcome"] for d in row["devices"]] == ["ok", "pending", "pending", "pending"]
    assert history.last_per_device()["d1"]["outcome"] == "ok"


def test_a_running_rollout_of_a_live_controller_stays_running(tmp_path):
    history.start("r2", "rollout", tmp_path / "f.yml", "img:2", "sha256:2", {}, [["d1"]])
    time.sleep(0.01)
    assert history.get("r2")["status"] == "running"  # this process is its controller


def test_history_of_an_unknown_rollout_is_bad_input(claw):
    result = claw("fleet", "history", "nope")
    assert result.code == 2 and "rollout 'nope' is not in the history" in result.err


def test_history_lists_rollouts_newest_first(claw, tmp_path):
    history.start("20260101-a", "rollout", tmp_path / "f.yml", "img:1", "sha256:1", {},
                  [["d1"]])
    history.device_update("20260101-a", "d1", outcome="ok", phase="committed")
    history.finish("20260101-a", "succeeded")
    history.start("20260102-b", "rollout", tmp_path / "f.yml", "img:2", "sha256:2", {},
                  [["d1"]])
    history.device_update("20260102-b", "d1", outcome="rolled_back", phase="rolled_back",
                          error="Check the new version's health: no healthy runtime")
    history.finish("20260102-b", "failed", "1 of 1 device(s) did not take the release")
    result = claw("fleet", "history", "--json")
    rows = json.loads(result.out)
    assert [r["id"] for r in rows] == ["20260102-b", "20260101-a"]
    result = claw("fleet", "history", "20260102")
    assert result.code == 0 and "rolled_back" in result.out and "no healthy runtime" in result.out
    assert Path(history.db_path()).is_file()


def test_hooks_come_from_the_profile_and_the_inventory_step_by_step(tmp_path, monkeypatch):
    """A profile's rollout.hooks are the default; an inventory's claw_rollout_hooks replace
    them step by step (so a group can add a step without losing the board's others)."""
    from provision.inventory import load_inventory
    from provision.provisioning import role_vars

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    folder = tmp_path / "config" / "clawforge" / "profiles"
    folder.mkdir(parents=True)
    (folder / "rpi5-hooked.yml").write_text(yaml.safe_dump({
        "name": "rpi5-hooked", "extends": "rpi5", "description": "rpi5 with rollout hooks",
        "rollout": {"hooks": {"before_download": ["df -h /var/lib/docker"],
                              "after_commit": ["logger released"]}}}))
    inv = tmp_path / "fleet.yml"
    inv.write_text(yaml.safe_dump({"all": {"hosts": {
        "a": {"claw_profile": "rpi5-hooked"},
        "b": {"claw_profile": "rpi5-hooked",
              "claw_rollout_hooks": {"after_commit": ["curl -fsS http://hub/ok"]}}}}}))
    inventory = load_inventory(inv)
    assert role_vars(inventory.hosts["a"])["claw_release_hooks"] == {
        "before_download": ["df -h /var/lib/docker"], "after_commit": ["logger released"]}
    assert role_vars(inventory.hosts["b"])["claw_release_hooks"] == {
        "before_download": ["df -h /var/lib/docker"], "after_commit": ["curl -fsS http://hub/ok"]}


@pytest.mark.parametrize("hooks,expected", [
    ({"before_dinner": ["true"]}, "claw_rollout_hooks[before_dinner]: 'before_dinner' is not "
                                  "valid (expected 'before_download', 'after_download'"),
    ({"after_commit": "logger x"}, "claw_rollout_hooks[after_commit]: 'logger x' is not valid "
                                   "(expected a valid list)"),
    ({"after_commit": [""]}, "claw_rollout_hooks[after_commit][0]: '' is not valid"),
])
def test_bad_hooks_are_refused_naming_the_step(hooks, expected, claw, tmp_path):
    inv = tmp_path / "fleet.yml"
    inv.write_text(yaml.safe_dump({"all": {"hosts": {
        "a": {"claw_profile": "rpi5", "claw_rollout_hooks": hooks}}}}))
    result = claw("inventory", "check", str(inv))
    assert result.code == 2 and expected in result.err, result.err
    assert "Traceback" not in result.err


def test_the_tarball_cache_keeps_the_newest_releases_only(tmp_path, monkeypatch):
    """Each rebuilt release has a new image id: without pruning the cache grows ~100 MB per
    build. The three most recently used tarballs stay."""
    from provision.fleet import rollout as ro

    folder = history.db_path().parent / "images"
    folder.mkdir(parents=True)
    exported: list[str] = []

    def fake_export(tag: str, path: Path) -> None:  # the docker part is tested with devices
        path.write_bytes(b"tar")
        path.with_name(path.name + ".sha256").write_text("x  y\n")
        exported.append(tag)

    def fake_layerless(tarball: Path, path: Path) -> Path:
        path.write_bytes(b"config")
        return path

    monkeypatch.setattr("images.transfer.export_image", fake_export)
    monkeypatch.setattr("images.transfer.layerless_copy", fake_layerless)

    def image_id(i: int) -> str:
        return f"sha256:{i}" + "ab" * 32

    hours_ago = time.time() - 2 * 3600
    for i in range(5):
        ro.tarball_for(f"img:{i}", image_id(i), lambda _: None)
        for path in folder.glob(f"{image_id(i)[7:23]}*.tar.zst"):  # used long ago, in order
            os.utime(path, (hours_ago + i, hours_ago + i))
    ro.tarball_for("img:2", image_id(2), lambda _: None)  # used again: kept, not redone
    kept = sorted(p.name[:16] for p in folder.glob("*.tar.zst") if "layerless" not in p.name)
    assert kept == sorted(image_id(i)[7:23] for i in (2, 3, 4))
    assert sorted(p.name[:16] for p in folder.glob("*.layerless.tar.zst")) == kept
    assert len(list(folder.glob("*.sha256"))) == 3
    assert exported == [f"img:{i}" for i in range(5)]


def test_the_tarball_cache_keeps_what_another_rollout_may_be_delivering(monkeypatch):
    """Two rollouts at once (two CI jobs, two operators) export releases into one cache: the
    newest three alone would drop a tarball the other is still copying to its next batch."""
    from provision.fleet import rollout as ro

    folder = history.db_path().parent / "images"

    def fake_export(tag: str, path: Path) -> None:
        path.write_bytes(b"tar")

    monkeypatch.setattr("images.transfer.export_image", fake_export)
    monkeypatch.setattr("images.transfer.layerless_copy", lambda t, p: p.write_bytes(b"c"))
    for i in range(5):
        ro.tarball_for(f"img:{i}", f"sha256:{i}" + "cd" * 32, lambda _: None)
    assert len([p for p in folder.glob("*.tar.zst") if "layerless" not in p.name]) == 5


@pytest.mark.parametrize("limit", ["site", "all:!rack1", "site:&rack2", "d*:!d2", "rack1,d4"])
def test_limit_selects_the_hosts_ansible_selects(limit, tmp_path):
    """A rollout plans its batches and records its devices from --limit: the selection must be
    Ansible's own, nested groups, `!` and `&` included (a parent group once selected nothing,
    and `!` was ignored)."""
    import sys

    from provision.inventory import load_inventory
    from provision.provisioning import limit_hosts

    rack = {"rack1": {"hosts": {"d1": {"claw_profile": "rpi5"}, "d2": {"claw_profile": "rpi5"}}},
            "rack2": {"hosts": {"d3": {"claw_profile": "rpi5"}}}}
    inv = tmp_path / "fleet.yml"
    inv.write_text(yaml.safe_dump({"all": {"children": {
        "site": {"children": rack}, "other": {"hosts": {"d4": {"claw_profile": "rpi5"}}}}}},
        sort_keys=False))
    bin_dir = os.path.dirname(sys.executable)
    done = subprocess.run([f"{bin_dir}/ansible-inventory", "-i", str(inv), "--limit", limit,
                           "--list"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expected = set(json.loads(done.stdout)["_meta"]["hostvars"])
    assert limit_hosts(load_inventory(inv), limit) == sorted(expected)


def runtime_inventory(tmp_path: Path) -> Path:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    inv = tmp_path / "fleet.yml"
    inv.write_text(yaml.safe_dump({"all": {"hosts": {
        h: {"claw_profile": "rpi5", "claw_runtime_model": str(model),
            "claw_runtime_install": "container"} for h in ("a", "b")}}}))
    return inv


@pytest.mark.parametrize("content,expected", [
    (b"name: not a model, a YAML file\n", "not a GGUF file (magic b'name'"),
    (b"GGUF\x03\x00\x00\x00" + b"\xff" * 16, "more than a 24-byte file can hold"),
])
def test_a_model_release_that_is_not_a_servable_gguf_is_refused(content, expected, claw,
                                                                 tmp_path):
    bad = tmp_path / "mroll-bad.gguf"
    bad.write_bytes(content)
    result = claw("fleet", "rollout", "-i", str(runtime_inventory(tmp_path)), "--model", str(bad))
    assert result.code == 2, result.out + result.err
    assert f"--model {bad}: " in result.err and expected in result.err
    assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err
    assert not history.db_path().exists()  # nothing recorded, nothing run


@pytest.mark.parametrize("args,expected", [
    (["--image", "x:1"], "--image TAG and --model FILE.gguf are not valid together"),
    (["--registry", "127.0.0.1:5000"], "a model release is copied to each device"),
])
def test_a_model_release_with_image_options_is_refused(args, expected, claw, tmp_path):
    model = tmp_path / "mroll.gguf"
    model.write_bytes(b"GGUF")
    result = claw("fleet", "rollout", "-i", str(runtime_inventory(tmp_path)), "--model",
                  str(model), *args)
    assert result.code == 2 and expected in result.err, result.err
    assert not history.db_path().exists()


def _docker_save_tarball(path: Path, members: dict[str, bytes]) -> None:
    """A zstd tarball laid out as `docker save` writes it (layers first, manifest last)."""
    import io
    import tarfile

    import zstandard

    with open(path, "wb") as raw, zstandard.ZstdCompressor().stream_writer(raw) as zst, \
            tarfile.open(fileobj=zst, mode="w|") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _members(path: Path) -> dict[str, bytes]:
    import tarfile

    import zstandard

    with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as stream, \
            tarfile.open(fileobj=stream, mode="r|") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]


def test_a_layerless_copy_keeps_all_but_the_layers_the_manifest_lists(tmp_path):
    """What a device with every layer loads instead of the whole release: the manifest, the
    config and the tags, byte for byte; the large layer stays out and so does the small one
    (a layer of a few bytes is still a layer: sent, it would be loaded for nothing)."""
    from images.transfer import layerless_copy

    big = os.urandom(3 << 20)
    manifest = json.dumps([{"Config": "cfg.json", "RepoTags": ["r:v2"],
                            "Layers": ["a/layer.tar", "b/layer.tar"]}]).encode()
    members = {"a/layer.tar": big, "a/json": b"{}", "b/layer.tar": b"tiny", "b/json": b"{}",
               "cfg.json": b'{"config": {}}', "manifest.json": manifest, "repositories": b"{}"}
    full = tmp_path / "r.tar.zst"
    _docker_save_tarball(full, members)
    out = layerless_copy(full, tmp_path / "r.layerless.tar.zst")
    assert _members(out) == {k: v for k, v in members.items() if not k.endswith("layer.tar")}
    assert out.stat().st_size < 2000 and not list(tmp_path.glob(".*.part"))


def test_a_layerless_copy_refuses_a_large_file_that_is_not_a_layer(tmp_path):
    """Leaving out anything else would make a copy that cannot stand in for the image."""
    from images.transfer import layerless_copy
    from provision.errors import ClawError

    manifest = json.dumps([{"Config": "cfg.json", "Layers": []}]).encode()
    full = tmp_path / "r.tar.zst"
    _docker_save_tarball(full, {"big.bin": os.urandom(2 << 20), "cfg.json": b"{}",
                                "manifest.json": manifest})
    with pytest.raises(ClawError, match=r"big\.bin is large and not a layer"):
        layerless_copy(full, tmp_path / "out.tar.zst")
    assert not (tmp_path / "out.tar.zst").exists()
