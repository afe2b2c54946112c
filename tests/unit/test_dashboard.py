"""The fleet dashboard's application against a temporary history and sample store: pages,
sorting and filtering, a rollout streamed as server-sent events while its rows change, the
token on actions (missing, wrong, expired), bad input as error pages with the right status,
runtime samples parsed from the runtime's own /metrics text, and benchmark tables and plots."""

from __future__ import annotations

import html
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from provision.dashboard import benchdata, charts, store
from provision.dashboard.app import Config, create_app
from provision.dashboard.auth import COOKIE, Auth, check_bind
from provision.dashboard.sampler import Sampler, Target, parse_metrics
from provision.errors import BadInput
from provision.fleet import history
from provision.inventory import load_inventory

pytestmark = pytest.mark.unit

TOKEN = "unit-test-token"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def inv(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    path = tmp_path / "fleet.yml"
    path.write_text(yaml.safe_dump({"all": {"children": {"boards": {
        "hosts": {"d1": {"claw_runtime_port": 18181}, "d2": {"claw_runtime_port": 18182},
                  "pi": {"claw_runtime_port": 18183, "claw_profile": "rpi5"}},
        "vars": {"ansible_host": "127.0.0.1", "claw_profile": "qemu-virt"}}}}}))
    return path


def make_client(inv: Path, pages_open: bool = True, session_s: float = 3600) -> TestClient:
    cfg = Config(load_inventory(inv), Auth(TOKEN, session_s, pages_open), sample_interval=0,
                 results=REPO / "bench" / "RESULTS.md")
    return TestClient(create_app(cfg))


def record(inv: Path, rid: str, outcomes: dict[str, tuple[str, str]], status: str) -> None:
    history.start(rid, "rollout", inv, "rt:v2", "sha256:x", {"canary": 1}, [list(outcomes)])
    for dev, (outcome, error) in outcomes.items():
        history.device_update(rid, dev, outcome=outcome, phase="committed" if outcome == "ok"
                              else "rolled_back", from_image="rt:v1", error=error,
                              started=time.time() - 5, ended=time.time())
    history.finish(rid, status, "1 of 2 device(s) did not take the release")


def sample(device: str, t: float, tokens: float, **more) -> dict:
    return {"device": device, "t": t, "online": 1, "health": "ok", "tokens": tokens,
            "requests_local": tokens / 10, "requests_offloaded": 0.0, "queue_depth": 1.0,
            "pressure": 0.0, "mem_total": 4e9, "mem_available": 3e9, "zram_used": 2**21,
            "error": "", **more}


def test_devices_table_lists_the_inventory_with_history_and_samples(inv):
    record(inv, "20261126-r1", {"d1": ("ok", ""), "d2": ("rolled_back", "no healthy runtime")},
           "failed")
    store.add([sample("d1", time.time(), 100.0)])
    c = make_client(inv)
    page = c.get("/devices")
    assert page.status_code == 200
    for name in ("d1", "d2", "pi", "rpi5", "qemu-virt", "rt:v2", "rolled_back", "25%"):
        assert name in page.text
    rows = {r["name"]: r for r in c.get("/api/devices").json()}
    assert rows["d1"]["online"] and rows["d1"]["health"] == "ok"
    assert rows["d1"]["release"] == "rt:v2" and rows["d2"]["release"] == ""
    assert rows["d1"]["mem_used"] == pytest.approx(0.25) and rows["d1"]["zram_mib"] == 2.0
    assert not rows["pi"]["online"] and rows["pi"]["health"] == "not sampled yet"
    names = [r["name"] for r in c.get("/api/devices?sort=profile&order=desc").json()]
    assert names[0] == "pi"
    assert [r["name"] for r in c.get("/api/devices?q=rolled").json()] == ["d2"]


@pytest.mark.parametrize("url,status,says", [
    ("/devices?sort=bogus", 400, "sort='bogus' is not valid"),
    ("/devices?order=up", 400, "order='up' is not valid"),
    ("/devices/nope", 404, "device 'nope' is not in"),
    ("/devices/d1?minutes=abc", 400, "minutes='abc' is not valid"),
    ("/devices/d1?minutes=99999", 400, "from 1 to 1440"),
    ("/rollouts?limit=-1", 400, "limit='-1'"),
    ("/rollouts/nope", 404, "not in the history"),
    ("/rollouts/nope/events", 404, "not in the history"),
    ("/rollouts/a%3Bb", 400, "is not valid"),
    ("/actions/reboot", 404, "no action 'reboot'"),
    ("/actions/rollback?device=zz", 404, "device 'zz'"),
    ("/jobs/123", 404, "no job"),
])
def test_bad_requests_get_error_pages(inv, url, status, says):
    page = make_client(inv).get(url)
    assert page.status_code == status
    text = html.unescape(page.text)
    assert says in text and "<html" in text and "Traceback" not in text


def test_device_page_shows_rollouts_provisioning_runs_and_charts(inv, tmp_path):
    record(inv, "20261126-r1", {"d1": ("ok", ""), "d2": ("rolled_back", "no healthy runtime")},
           "failed")
    run = tmp_path / "state" / "clawforge" / "runs" / "20261126-010101-provision-abc123"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({
        "run_id": run.name, "check": False, "tags": ["zram"], "hosts": [
            {"host": "d2", "status": "failed", "ok": 3, "changed": 1, "skipped": 0,
             "failed_task": "zram : start", "message": "unit failed"}]}))
    now = time.time()
    store.add([sample("d2", now - 20 + i * 5, 100.0 + 50 * i) for i in range(4)])
    page = make_client(inv).get("/devices/d2?minutes=5").text
    assert "no healthy runtime" in page and "20261126-r1" in page
    assert run.name in page and "zram : start" in page and "unit failed" in page
    assert page.count("<polyline") >= 4
    assert 'data-series="tokens/s" data-points="3"' in page
    assert "4 samples" in page


def test_charts_turn_counters_into_rates_and_skip_restarts():
    s = [sample("d", 0, 100.0), sample("d", 10, 200.0), sample("d", 20, 5.0),
         sample("d", 30, 55.0, mem_available=1e9, pressure=1.0)]
    tokens, queue, requests, memory = charts.runtime_charts(s, 0, 30)
    assert tokens.series[0].points == [(10, 10.0), (30, 5.0)]  # the reset at t=20 left out
    assert queue.series[0].points[-1] == (30, 1.0)
    assert requests.series[0].points == [(10, 10.0), (30, 5.0)]
    assert memory.series[0].points[-1] == (30, 1.0) and memory.series[1].points[-1] == (30, 0.75)
    assert tokens.polyline(tokens.series[0]).count(",") == 2


def test_a_running_rollout_streams_its_changes_then_ends(inv):
    history.start("20261126-live", "rollout", inv, "rt:v3", "sha", {}, [["d1"], ["d2"]])
    c = make_client(inv)
    assert c.get("/rollouts/20261126-live/events?poll=abc").status_code == 400

    def progress() -> None:
        for phase in ("delivered", "installed", "committed"):
            time.sleep(0.3)
            history.device_update("20261126-live", "d1", phase=phase)
        history.device_update("20261126-live", "d1", outcome="ok")
        history.device_update("20261126-live", "d2", outcome="failed", error="unreachable: ssh")
        time.sleep(0.3)
        history.finish("20261126-live", "failed", "1 of 2 device(s) did not take the release")

    writer = threading.Thread(target=progress)
    writer.start()
    events = []
    with c.stream("GET", "/rollouts/20261126-live/events?poll=0.1") as stream:
        for line in stream.iter_lines():
            if line.startswith("data: {\""):
                events.append(json.loads(line[6:]))
    writer.join()
    phases = [next(d["phase"] for d in e["devices"] if d["device"] == "d1") for e in events]
    assert phases[0] == "waiting" and phases[-1] == "committed"
    assert {"delivered", "installed"} <= set(phases)
    assert events[-1]["status"] == "failed" and events[-1]["done"] == 2
    assert events[-1]["devices"][1]["error"] == "unreachable: ssh"
    page = c.get("/rollouts/20261126-live").text
    assert "unreachable: ssh" in page and "data-events" not in page  # over: nothing to follow


def test_actions_need_the_token_and_a_confirmation(inv):
    c = make_client(inv)
    form = {"image": "rt:v2", "confirm": "yes"}
    assert c.post("/actions/rollout", data=form).status_code == 401
    assert c.post("/actions/rollout", data={**form, "token": "wrong-token"}).status_code == 403
    assert c.post("/actions/rollout", data=form,
                  headers={"Authorization": "Bearer nope"}).status_code == 403
    page = c.post("/actions/rollout", data={"image": "rt:v2", "token": TOKEN})
    assert page.status_code == 400 and "not confirmed" in page.text
    page = c.post("/actions/rollout", data={**form, "token": TOKEN, "batch": "0"})
    assert page.status_code == 400 and "--batch '0' is not valid" in html.unescape(page.text)
    page = c.post("/actions/provision", data={**form, "token": TOKEN, "limit": "ghost"})
    assert page.status_code == 400 and "matches no host or group" in page.text
    page = c.post("/actions/provision", data={**form, "token": TOKEN, "tags": "nosuchrole"})
    assert page.status_code == 400 and "nosuchrole: unknown" in page.text
    assert c.get("/rollouts").text.count("data-rollout=") == 0  # nothing was started


def test_an_accepted_action_runs_claw_and_its_failure_is_shown(inv):
    """The rollout runs as a real `claw fleet rollout`; this inventory has no runtime service,
    so the driver refuses it, and the job page says why."""
    c = make_client(inv)
    c.get(f"/login?token={TOKEN}")  # a session: the form needs no token field now
    done = c.post("/actions/rollout", data={"image": "rt:v2", "confirm": "yes",
                                            "limit": "d1"}, follow_redirects=False)
    assert done.status_code == 303
    job_url = done.headers["location"]
    for _ in range(200):
        job = c.get(job_url + ".json").json()
        if not job["running"]:
            break
        time.sleep(0.1)
    assert job["rc"] == 2 and "--limit d1" in job["command"]
    assert "no runtime service that runs images" in job["output"]
    assert "no runtime service" in c.get(job_url).text


def test_sessions_expire_and_pages_off_loopback_need_the_token(inv):
    closed = make_client(inv, pages_open=False, session_s=1)
    page = closed.get("/devices")
    assert page.status_code == 401 and 'name="token"' in page.text
    assert closed.get("/login?token=bad-token").status_code == 403
    login = closed.post("/login", data={"token": TOKEN, "next": "/rollouts"},
                        follow_redirects=False)
    assert login.status_code == 303 and login.headers["location"] == "/rollouts"
    assert closed.get("/devices").status_code == 200
    time.sleep(2.1)
    page = closed.get("/devices")
    assert page.status_code == 401 and "the session expired" in page.text
    forged = make_client(inv, pages_open=False)
    assert forged.get("/devices", headers={"cookie": f"{COOKIE}=9999999999.forged"}
                      ).status_code == 403
    assert closed.get("/static/dash.js").status_code == 200  # the login page's own assets


def test_binding_beyond_loopback_needs_a_token():
    assert len(check_bind("127.0.0.1", None)) > 16
    assert check_bind("0.0.0.0", "long-enough") == "long-enough"
    with pytest.raises(BadInput, match="needs --token"):
        check_bind("0.0.0.0", None)
    with pytest.raises(BadInput, match="too short"):
        check_bind("::1", "short")


def test_cli_refuses_bad_input_in_one_line(claw, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    bad = tmp_path / "bad.yml"
    bad.write_text("all: [unclosed\n")
    result = claw("fleet", "dashboard", "-i", str(bad))
    assert result.code == 2 and "bad.yml" in result.err and "Traceback" not in result.err
    result = claw("fleet", "dashboard", "-i", str(bad), "--host", "0.0.0.0")
    assert result.code == 2 and "needs --token" in result.err


class FakeRuntime(BaseHTTPRequestHandler):
    """Serves the real Metrics registry's exposition text (as the runtime server renders it)."""

    metrics = b""

    def do_GET(self) -> None:
        body = (b'{"status": "ok", "model": "tiny"}' if self.path == "/health"
                else self.metrics)
        self.send_response(200)
        self.send_header("content-type", "application/json" if self.path == "/health"
                         else "text/plain")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_) -> None:
        pass


def test_sampler_reads_the_runtime_metrics(tmp_path, monkeypatch):
    from runtime.server.metrics import Metrics
    from runtime.server.monitor import Reading

    m = Metrics()
    m.tokens.labels("completion", "local").inc(40)
    m.tokens.labels("prompt", "offload").inc(2)
    m.requests.labels("completions", "normal", "local", "ok").inc(3)
    m.requests.labels("completions", "batch", "offload", "ok").inc(2)
    m.pressure.set(1)
    reading = Reading(mem_total=8 * 2**30, mem_available=2 * 2**30, zram_used=2**20)
    text = m.render(None, reading)
    figures = parse_metrics(text.decode())
    assert figures["tokens"] == 42 and figures["requests_local"] == 3
    assert figures["requests_offloaded"] == 2 and figures["pressure"] == 1
    assert figures["mem_available"] == 2 * 2**30 and figures["zram_used"] == 2**20

    FakeRuntime.metrics = text
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeRuntime)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    db = tmp_path / "samples.db"
    try:
        port = server.server_address[1]
        rows = Sampler(lambda: [Target("up", f"http://127.0.0.1:{port}"),
                                Target("down", "http://127.0.0.1:9")], 1.0, db).sample_once()
    finally:
        server.shutdown()
    by = {r["device"]: r for r in rows}
    assert by["up"]["online"] == 1 and by["up"]["health"] == "ok" and by["up"]["tokens"] == 42
    assert by["down"]["online"] == 0 and by["down"]["health"] == "unreachable"
    assert "Connect" in by["down"]["error"]
    assert set(store.latest(db)) == {"up", "down"}


def test_bench_results_parse_render_and_plot(inv, tmp_path, claw):
    tables = benchdata.load(REPO / "bench" / "RESULTS.md")
    assert len(tables) >= 5
    numpy = next(t for t in tables if "numpy reference" in t.section)
    assert numpy.labels() == ["llama-0.5b F16", "llama-0.5b Q8_0"]
    assert dict(numpy.series())["prefill tok/s"] == [128.1, 172.3]
    page = make_client(inv).get("/bench").text
    assert page.count("<rect") >= sum(len(t.labels()) for t in tables)
    out = tmp_path / "plots" / "results.png"
    result = claw("runtime", "bench", "--plot", str(out))
    assert result.code == 0, result.err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20000
    result = claw("runtime", "bench", "--plot", str(tmp_path / "x.png"), "--results",
                  str(tmp_path / "missing.md"))
    assert result.code == 2 and "missing.md: cannot read" in result.err
