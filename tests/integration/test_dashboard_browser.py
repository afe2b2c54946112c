"""The fleet dashboard in a real browser against two emulated devices with their own Docker
engines, provisioned for the runtime container: the page lists them, a rollout started from the
page shows its progress live and ends with each device's outcome (a release that fails on one
board shows that board's error), the runtime charts draw samples taken from the devices'
/metrics, and an action without the token is refused. Screenshots: tests/artifacts/."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.browser import chromium, close, screenshot
from tests.conftest import CLAW, claw_subprocess, dexec
from tests.fleet_images import REV_B_MARKER, release_fleet
from tests.serve_model import tiny_chat_gguf

pytestmark = pytest.mark.integration

FLEET = f"dash{os.getpid() % 100000}"
PREFIX = f"claw-dashtest-{os.getpid()}"
TOKEN = "dashboard-test-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Two engine devices provisioned for the runtime, two releases, and the dashboard."""
    work = tmp_path_factory.mktemp("dash")
    model = tiny_chat_gguf(tmp_path_factory.mktemp("tiny"))
    with release_fleet(2, FLEET, PREFIX, work, model, {"v1": "", "v2": "rev-b"}) as built:
        port = free_port()
        log = (work / "dashboard.log").open("w")
        server = subprocess.Popen([str(CLAW), "fleet", "dashboard", "-i", str(built.inventory),
                                   "--port", str(port), "--token", TOKEN, "--sample", "1"],
                                  stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/devices", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        try:
            yield {"url": url, "names": built.names, "releases": built.releases,
                   "inventory": built.inventory, "ports": built.ports,
                   "log": work / "dashboard.log"}
        finally:
            server.terminate()
            server.wait(timeout=60)


@pytest.fixture
def browser():
    driver = chromium()
    yield driver
    close(driver)


def login(browser, fleet) -> None:
    browser.get(f"{fleet['url']}/login?token={TOKEN}")


def text(browser, css: str) -> str:
    return browser.find_element(By.CSS_SELECTOR, css).text


def test_the_page_lists_the_devices(browser, fleet):
    login(browser, fleet)
    browser.get(fleet["url"] + "/devices")
    rows = browser.find_elements(By.CSS_SELECTOR, "#devices tbody tr[data-device]")
    assert [r.get_attribute("data-device") for r in rows] == sorted(fleet["names"])
    assert all("qemu-virt" in r.text for r in rows)
    # filtering in place hides the other device
    browser.find_element(By.ID, "filter").send_keys(fleet["names"][1])
    visible = [r for r in rows if r.is_displayed()]
    assert [r.get_attribute("data-device") for r in visible] == [fleet["names"][1]]
    screenshot(browser, "devices")


def test_actions_are_refused_without_the_token(browser, fleet):
    browser.get(fleet["url"] + "/actions/rollout")  # pages are open on loopback, actions not
    browser.find_element(By.ID, "image").send_keys(fleet["releases"]["v1"])
    browser.find_element(By.ID, "confirm").click()
    browser.find_element(By.ID, "submit").click()
    assert "a token is needed" in text(browser, "#error-message")
    screenshot(browser, "action-refused")
    history = httpx.get(fleet["url"] + "/rollouts").text
    assert fleet["releases"]["v1"] not in history  # nothing was started


def start_rollout(browser, fleet, image: str, max_fail: str) -> dict[str, set[str]]:
    """Start from the form, follow the job to the rollout page, and watch it live: returns
    the phases each device was seen in before the rollout ended."""
    browser.get(fleet["url"] + "/actions/rollout")
    browser.find_element(By.ID, "image").send_keys(image)
    field = browser.find_element(By.ID, "batch")
    field.clear()
    field.send_keys("100%")
    field = browser.find_element(By.ID, "max_fail")
    field.clear()
    field.send_keys(max_fail)
    browser.find_element(By.ID, "confirm").click()
    browser.find_element(By.ID, "submit").click()
    return follow(browser)


def follow(browser) -> dict[str, set[str]]:
    """From the job page on to the rollout page, watched until it ends: the phases each
    device was seen in."""
    WebDriverWait(browser, 60).until(lambda b: "/rollouts/" in b.current_url)
    seen: dict[str, set[str]] = {}
    deadline = time.time() + 600
    while time.time() < deadline:
        box = browser.find_element(By.ID, "rollout")
        for row in box.find_elements(By.CSS_SELECTOR, "#rollout-devices tbody tr"):
            seen.setdefault(row.get_attribute("data-device"), set()).add(
                row.find_element(By.CSS_SELECTOR, ".phase").text)
        if box.get_attribute("data-ended") == "1" or box.get_attribute("data-status") not in (
                "running", None):
            break
        time.sleep(0.3)
    return seen


def outcomes(browser) -> dict[str, tuple[str, str]]:
    rows = browser.find_elements(By.CSS_SELECTOR, "#rollout-devices tbody tr")
    return {r.get_attribute("data-device"): (r.find_element(By.CSS_SELECTOR, ".outcome").text,
                                             r.find_element(By.CSS_SELECTOR, ".error").text)
            for r in rows}


def test_a_rollout_started_from_the_page_shows_live_progress(browser, fleet):
    login(browser, fleet)
    started = time.monotonic()
    seen = start_rollout(browser, fleet, fleet["releases"]["v1"], "10%")
    assert set(seen) == set(fleet["names"])
    took = time.monotonic() - started
    screenshot(browser, "rollout-succeeded")
    assert text(browser, "#status") == "succeeded", (seen, fleet["log"].read_text()[-2000:])
    assert {n: o for n, (o, _) in outcomes(browser).items()} == dict.fromkeys(fleet["names"],
                                                                               "ok")
    # the page changed while the rollout ran: the canary's phases arrived one by one
    canary = fleet["names"][0]
    assert len(seen[canary]) >= 3, seen
    assert "committed" in seen[canary]
    print(f"rollout of 2 devices from the page: {took:.0f} s")


def test_a_device_that_fails_shows_its_error(browser, fleet):
    login(browser, fleet)
    bad = fleet["names"][1]
    dexec(bad, f"touch {REV_B_MARKER}")
    try:
        start_rollout(browser, fleet, fleet["releases"]["v2"], "100%")
    finally:
        dexec(bad, f"rm -f {REV_B_MARKER}")
    screenshot(browser, "rollout-failed-device")
    assert text(browser, "#status") == "failed"
    rows = outcomes(browser)
    assert rows[fleet["names"][0]][0] == "ok"
    assert rows[bad][0] == "rolled_back"
    assert "no healthy runtime" in rows[bad][1]
    assert "1 of 2 device(s) did not take the release" in text(browser, "#rollout-error")
    # the device page keeps it too
    browser.get(f"{fleet['url']}/devices/{bad}")
    assert "no healthy runtime" in text(browser, "#device-rollouts")


def test_undo_a_rollout_from_its_page(browser, fleet):
    """The failed rollout's "Undo" puts the device it upgraded back on the release before."""
    login(browser, fleet)
    browser.get(fleet["url"] + "/rollouts")
    failed = browser.find_element(By.CSS_SELECTOR, "#rollouts tbody tr[data-rollout]")
    assert "failed" in failed.text and fleet["releases"]["v2"] in failed.text
    failed.find_element(By.CSS_SELECTOR, "a").click()
    browser.find_element(By.LINK_TEXT, "Undo this rollout…").click()
    assert browser.find_element(By.ID, "rollout").get_attribute("value")
    browser.find_element(By.ID, "confirm").click()
    browser.find_element(By.ID, "submit").click()
    follow(browser)
    screenshot(browser, "rollback")
    assert text(browser, "#status") == "succeeded"
    rows = {r.get_attribute("data-device"): r.text for r in browser.find_elements(
        By.CSS_SELECTOR, "#rollout-devices tbody tr")}
    upgraded = fleet["names"][0]
    assert list(rows) == [upgraded]  # the other one never left v1
    assert fleet["releases"]["v1"] in rows[upgraded] and "ok" in rows[upgraded]


def test_charts_render_with_real_data(browser, fleet):
    name = fleet["names"][0]
    port = fleet["ports"][name]
    model = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()["model"]
    for _ in range(4):
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                            json={"model": model, "prompt": "Hello", "max_tokens": 8})
        assert answer.status_code == 200, answer.text
        time.sleep(1.2)
    time.sleep(2.5)
    browser.get(f"{fleet['url']}/devices/{name}?minutes=30")
    screenshot(browser, "device-charts")
    tokens = browser.find_element(By.CSS_SELECTOR, "figure[data-chart='Tokens per second']")
    line = tokens.find_element(By.CSS_SELECTOR, "polyline")
    assert int(line.get_attribute("data-points")) >= 2
    ys = [float(p.split(",")[1]) for p in line.get_attribute("points").split()]
    assert min(ys) < max(ys)  # the completions show as a rise, not a flat line
    local = browser.find_element(By.CSS_SELECTOR, "polyline[data-series='local']")
    assert int(local.get_attribute("data-points")) >= 2
    memory = browser.find_element(By.CSS_SELECTOR, "polyline[data-series='memory used']")
    assert int(memory.get_attribute("data-points")) >= 2
    # the devices table now shows both online, healthy, with memory figures
    browser.get(fleet["url"] + "/devices")
    for row in browser.find_elements(By.CSS_SELECTOR, "#devices tbody tr[data-device]"):
        assert "online" in row.text and " ok " in f" {row.text} ", row.text
        assert "%" in row.text
    screenshot(browser, "devices-sampled")
    browser.get(fleet["url"] + "/bench")
    assert browser.find_elements(By.CSS_SELECTOR, "section.bench svg rect")
    screenshot(browser, "bench")
    browser.get(fleet["url"] + "/rollouts")
    screenshot(browser, "rollouts")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#rollouts tbody tr[data-rollout]")) >= 2


def test_reprovision_a_device_from_its_page(browser, fleet):
    login(browser, fleet)
    name = fleet["names"][1]
    browser.get(f"{fleet['url']}/devices/{name}")
    browser.find_element(By.LINK_TEXT, "Re-provision…").click()
    assert browser.find_element(By.ID, "limit").get_attribute("value") == name
    browser.find_element(By.ID, "tags").send_keys("claw_runtime")
    browser.find_element(By.ID, "confirm").click()
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, 600, poll_frequency=1).until(
        lambda b: text(b, "#job-state") != "running")
    screenshot(browser, "reprovision-job")
    assert text(browser, "#job-state") == "exited 0", text(browser, "#job-output")
    assert name in text(browser, "#job-output")
    browser.get(f"{fleet['url']}/devices/{name}")
    runs = text(browser, "#device-provisions")
    assert "claw_runtime" in runs and " ok " in f" {runs} "


def test_pages_need_the_token_beyond_loopback(fleet):
    """A dashboard on another address asks for the token on every page (and refuses to start
    without one)."""
    done = claw_subprocess("fleet", "dashboard", "-i", str(fleet["inventory"]), "--host",
                           "0.0.0.0")
    assert done.code == 2 and "needs --token" in done.err
    assert Path(fleet["log"]).exists()
