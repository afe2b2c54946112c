"""Shipped profiles are valid, consistent, and the user directory can add or override them."""

from __future__ import annotations

import json
import textwrap

import pytest

from provision.profiles import ProfileStore

pytestmark = pytest.mark.unit

SHIPPED = {"rk3588", "rpi5", "jetson-orin", "generic-arm64", "qemu-virt"}


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


def test_every_shipped_profile_is_valid():
    store = ProfileStore()
    assert set(store.names()) >= SHIPPED
    assert store.check_all() == []


def test_hardware_facts_of_the_shipped_boards():
    store = ProfileStore()
    rk = store.get("rk3588")
    clusters = {c.name: c for c in rk.cpu}
    assert clusters["big"].core == "Cortex-A76" and clusters["big"].cores == [4, 5, 6, 7]
    assert clusters["little"].core == "Cortex-A55" and clusters["little"].cores == [0, 1, 2, 3]
    assert rk.runtime.cpu_affinity == [4, 5, 6, 7]  # inference on the big cores
    assert rk.gpu.name == "Mali-G610 MP4" and rk.opencl_stacks[0] == "rusticl"
    pi = store.get("rpi5")
    assert pi.gpu.name is None and pi.opencl_stacks == ["pocl"]
    assert pi.hugepages.page_kb == 32768  # 16K-page kernel
    assert len(store.get("jetson-orin").core_ids) == 8
    assert store.get("qemu-virt").os.root_device == "/dev/vda"


def test_every_profile_file_cites_its_sources():
    store = ProfileStore()
    for name in SHIPPED:
        text = store.source(name).path.read_text()
        assert "Sources:" in text, name


def test_user_profile_extends_and_overrides(tmp_path):
    user = tmp_path / "config" / "clawforge" / "profiles"
    user.mkdir(parents=True)
    (user / "rock5b-16g.yml").write_text(textwrap.dedent("""\
        name: rock5b-16g
        extends: rk3588
        description: ROCK 5B with 16 GB, vendor blob
        ram_gb: [16]
        runtime: {threads: 3, cpu_affinity: [5, 6, 7]}
    """))
    (user / "rpi5.yml").write_text(
        store_text := ProfileStore().source("rpi5").path.read_text().replace(
            "governor: performance", "governor: schedutil"))
    assert "schedutil" in store_text
    store = ProfileStore()
    child = store.get("rock5b-16g")
    assert child.ram_gb == [16] and child.runtime.threads == 3
    assert child.runtime.prefill_chunk == store.get("rk3588").runtime.prefill_chunk  # inherited
    assert child.soc == "Rockchip RK3588"
    assert store.origin("rpi5") == "user" and store.get("rpi5").governor == "schedutil"


def test_profiles_cli_list_and_show(claw):
    listed = claw("profiles", "list", "--json")
    assert listed.code == 0
    assert {p["name"] for p in json.loads(listed.out)} >= SHIPPED
    shown = claw("profiles", "show", "rk3588", "--json")
    assert shown.code == 0 and json.loads(shown.out)["soc"] == "Rockchip RK3588"
    table = claw("profiles", "list")
    assert "rk3588" in table.out and "Mali-G610" in table.out
    missing = claw("profiles", "show", "rk3399")
    assert missing.code == 2 and "unknown profile 'rk3399'" in missing.err
