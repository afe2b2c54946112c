"""`claw runtime serve` as real processes on loopback ports, called the way users call it.

An edge server (the device) offloads to a second instance of our own server (the cloud)
through a fault-injecting proxy. Memory pressure here is injected through the monitor's
documented `inject_file` hook, so the fault matrix can switch it on and off at will;
test_serve_pressure.py makes real pressure in a memory cgroup instead.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("torch")

from runtime.api import Model  # noqa: E402
from runtime.sampling import SamplingParams  # noqa: E402
from tests.integration.serve_helpers import (  # noqa: E402
    free_port,
    set_fault,
    start_fault_proxy,
    start_server,
    wait_until,
)
from tests.serve_model import tiny_chat_gguf  # noqa: E402

pytestmark = pytest.mark.integration

KEY, CLOUD_KEY = "sk-edge-test", "sk-cloud-test"
HI = [{"role": "user", "content": "Say something about fleets."}]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def model_path(work):
    return tiny_chat_gguf(work / "model")


@pytest.fixture(scope="module")
def cloud(work, model_path):
    (work / "cloud.key").write_text(CLOUD_KEY + "\n")
    p = start_server(work, {"model": str(model_path), "model_name": "cloud-tiny",
                            "api_key_file": str(work / "cloud.key"),
                            "scheduler": {"max_batch": 8, "max_queue": 256}}, name="cloud")
    yield p
    p.stop()


@pytest.fixture(scope="module")
def proxy(work, cloud):
    p = start_fault_proxy(work, cloud.url, slow_s=3.0, cut_after=3)
    yield p
    p.stop()


def offload_section(work, url):
    return {"enabled": True, "url": url, "model": "cloud-tiny",
            "api_key_file": str(work / "cloud.key"), "timeout_s": 1.0, "retries": 1,
            "backoff_s": 0.05}


def monitor_section(inject):
    return {"interval_s": 0.05, "hold_s": 0.3, "psi_some_avg10": 10.0,
            "mem_available_min_fraction": 0.01, "cgroup_usage_max_fraction": 1.0,
            "inject_file": str(inject)}


@pytest.fixture(scope="module")
def edge(work, model_path, proxy):
    inject = work / "pressure.json"
    inject.write_text("{}")
    p = start_server(work, {"model": str(model_path), "model_name": "tiny",
                            "scheduler": {"max_batch": 4, "max_queue": 64,
                                          "max_tokens_limit": 1000},
                            "offload": offload_section(work, proxy.v1),
                            "monitor": monitor_section(inject)},
                     name="edge", extra_args=["--api-key", KEY])
    p.inject = inject
    yield p
    p.stop()


def pressure(edge, on: bool) -> None:
    edge.inject.write_text(json.dumps({"psi_some_avg10": 99.0} if on else {}))
    wait_until(lambda: httpx.get(edge.url + "/health").json()["pressure"] is on, timeout=10)


def client(edge, **kw):
    return openai.OpenAI(base_url=edge.v1, api_key=KEY, max_retries=0, timeout=60, **kw)


# ---- the OpenAI API ------------------------------------------------------------------------


def test_openai_client_chat_completions_and_streams_match_the_python_api(edge, model_path):
    c = client(edge)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    local = Model(model_path, backend="numpy")
    expected = "".join(local.generate(local.chat_prompt(HI), SamplingParams.greedy(
        max_tokens=12), add_bos=False))

    chat = c.chat.completions.create(model="tiny", messages=HI, max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == expected
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens <= 12 and chat.usage.prompt_tokens > 5

    chunks = list(c.chat.completions.create(model="tiny", messages=HI, max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == \
        chat.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert len({ch.id for ch in chunks}) == 1

    prompt_text = "The fleet"
    want = "".join(local.generate(prompt_text, SamplingParams.greedy(max_tokens=6)))
    done = c.completions.create(model="tiny", prompt=prompt_text, max_tokens=6, temperature=0)
    assert done.choices[0].text == want
    streamed = c.completions.create(model="tiny", prompt=prompt_text, max_tokens=6,
                                    temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == want


def test_metrics_are_valid_prometheus_text(edge):
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(edge.url + "/metrics").text
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"claw_requests", "claw_tokens", "claw_request_seconds", "claw_first_token_seconds",
            "claw_queue_depth", "claw_active_sequences", "claw_offload_decisions",
            "claw_memory_bytes", "claw_memory_pressure", "claw_model_loaded"} <= names
    assert edge.metric("claw_model_loaded") == 1
    assert edge.metric("claw_memory_bytes", signal="mem_available") > 0


def test_api_key_is_required_and_checked(edge):
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=edge.v1, api_key="sk-wrong", max_retries=0).models.list()
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    bare = httpx.post(edge.v1 + "/chat/completions", json={"model": "tiny", "messages": HI})
    assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(edge.url + "/health").json() == {
        "status": "ok", "model": "tiny", "pressure": False, "offload": True}


def bad_requests(rng: random.Random) -> list[tuple[str, object, int, str | None]]:
    """(endpoint, body, expected status, expected param) — ≥ 200 cases."""
    chat = {"model": "tiny", "messages": HI, "max_tokens": 2}
    comp = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    cases: list[tuple[str, object, int, str | None]] = [
        ("chat/completions", raw, 400, None) for raw in (
            b"{", b"", b"nul", b'{"model": "tiny",}', b"\xff\xfe", b'{"a": NaN', b"[1, 2",
            b'"text"', b"[]", b"42", b"null", b"true")]
    wrong = {
        "model": [1, None, [], {}, ""], "messages": ["hi", [], [{"role": "bot", "content": "x"}],
                                                     [{"content": "x"}],
                                                     [{"role": "user", "content": 5}], None],
        "max_tokens": ["5", -1, 0, 1.5, True, 10**9, 2**70],
        "temperature": ["hot", -1, 2.5, []], "top_p": [0, 1.5, "x"],
        "stop": [5, ["a", "b", "c", "d", "e"], [1]], "stream": ["yes", 1],
        "n": [2, 0, "1"], "seed": ["x", 1.5], "priority": ["urgent", 1, "CRITICAL"],
        "presence_penalty": [3, "x"], "stream_options": ["x", {"include_usage": "yes"}],
    }
    for field, values in wrong.items():
        for value in values:
            cases.append(("chat/completions", {**chat, field: value}, 400, field))
    for value in (5, -2, [], [None], ["a", "b"], [10**7], 3.5, None, {}):
        cases.append(("completions", {**comp, "prompt": value}, 400, "prompt"))
    cases.append(("chat/completions", {"messages": HI}, 400, "model"))
    cases.append(("chat/completions", {"model": "tiny"}, 400, "messages"))
    cases.append(("chat/completions", {**chat, "model": "gpt-4o"}, 404, "model"))
    cases.append(("completions", {**comp, "model": "nope"}, 404, "model"))
    cases.append(("completions", {**comp, "prompt": "fleet " * 600}, 400, "prompt"))
    cases.append(("chat/completions", {**chat, "max_tokens": 900}, 400, "messages"))
    cases.append(("completions", {**comp, "max_tokens": 1001}, 400, "max_tokens"))
    # Random damage to valid bodies: anything but a crash is acceptable, so only the shape
    # of the answer is checked for these (status None).
    pool = [None, "", -1, 0, 1e308, [], {}, "🙂", 2**70, True, "critical", [1, 2], {"a": 1}]
    while len(cases) < 260:
        base = dict(rng.choice((chat, comp)))
        for _ in range(rng.randint(1, 3)):
            base[rng.choice([*base, "top_k", "min_p", "stop", "stream", "seed"])] = \
                rng.choice(pool)
        cases.append(("completions" if "prompt" in base else "chat/completions", base, -1,
                      None))
    return cases


def test_bad_requests_get_openai_error_objects(edge):
    cases = bad_requests(random.Random(7))
    assert len(cases) >= 200
    with httpx.Client(base_url=edge.v1, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=30) as http:
        for endpoint, body, status, param in cases:
            if isinstance(body, bytes):
                r = http.post(endpoint, content=body, headers={"content-type":
                                                              "application/json"})
            else:
                r = http.post(endpoint, json=body)
            where = f"{endpoint} {body!r:.200} → {r.status_code} {r.text[:300]}"
            assert r.status_code < 500, where
            if r.status_code == 200:
                assert status == -1, where
                text = r.text
                assert ("[DONE]" in text) if "data:" in text else \
                    r.json()["choices"][0]["finish_reason"], where
                continue
            assert status in (-1, r.status_code), where
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}, where
            assert err["message"] and err["type"], where
            if param is not None:
                assert err["param"] is not None and err["param"].startswith(param), where
    assert httpx.get(edge.url + "/health").status_code == 200


# ---- offload and fallback -----------------------------------------------------------------


def test_pressure_offloads_normal_keeps_critical_and_returns(edge, proxy):
    set_fault(proxy, "pass")
    c = client(edge)
    pressure(edge, True)
    r = c.chat.completions.with_raw_response.create(model="tiny", messages=HI, max_tokens=4,
                                                    extra_body={"top_k": 5})
    assert r.headers["x-claw-route"] == "offload"
    forwarded = httpx.get(proxy.url + "/_stats").json()["last_fields"]
    assert forwarded == ["max_tokens", "messages", "model", "stream", "stream_options"]
    assert r.parse().choices[0].finish_reason in ("stop", "length")
    crit = c.chat.completions.with_raw_response.create(
        model="tiny", messages=HI, max_tokens=4, extra_headers={"X-Priority": "critical"})
    assert crit.headers["x-claw-route"] == "local"
    crit_body = c.chat.completions.with_raw_response.create(
        model="tiny", messages=HI, max_tokens=4, extra_body={"priority": "critical"})
    assert crit_body.headers["x-claw-route"] == "local"
    pressure(edge, False)
    back = c.chat.completions.with_raw_response.create(model="tiny", messages=HI, max_tokens=4)
    assert back.headers["x-claw-route"] == "local"
    assert edge.metric("claw_offload_decisions_total", decision="offload") >= 1
    assert edge.metric("claw_memory_pressure_transitions_total") >= 2


@pytest.mark.parametrize("fault", ["500", "slow", "cut"])
def test_remote_faults_fall_back_to_local_in_one_stream(edge, proxy, cloud, fault):
    c = client(edge)
    remote = openai.OpenAI(base_url=cloud.v1, api_key=CLOUD_KEY, max_retries=0)
    cloud_text = remote.chat.completions.create(model="cloud-tiny", messages=HI, max_tokens=10,
                                                temperature=0).choices[0].message.content
    before = edge.metric("claw_offload_decisions_total", decision="fallback")
    answered = edge.metric("claw_requests_total", route="fallback", outcome="ok")
    set_fault(proxy, fault)
    pressure(edge, True)
    try:
        raw = c.chat.completions.with_raw_response.create(
            model="tiny", messages=HI, max_tokens=10, temperature=0, stream=True)
        assert raw.headers["x-claw-route"] == "offload"
        chunks = list(raw.parse())
    finally:
        set_fault(proxy, "pass")
        pressure(edge, False)
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices
                and ch.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length")
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text
    if fault == "cut":  # the cloud's first pieces, then the local model's continuation
        assert text[:2] == cloud_text[:2] and len(text) > 2
    assert edge.metric("claw_offload_decisions_total", decision="fallback") == before + 1
    assert edge.metric("claw_requests_total", route="fallback", outcome="ok") == \
        answered + 1


def test_client_disconnect_mid_stream_frees_the_sequence(edge):
    cancelled = edge.metric("claw_requests_total", outcome="cancelled")
    with httpx.Client(timeout=30) as http, http.stream(
            "POST", edge.v1 + "/completions", headers={"Authorization": f"Bearer {KEY}"},
            json={"model": "tiny", "prompt": "Once", "max_tokens": 480, "stream": True,
                  "priority": "critical"}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert got[0].startswith("data:")
    wait_until(lambda: edge.metric("claw_requests_total", outcome="cancelled") == cancelled + 1)
    wait_until(lambda: edge.metric("claw_active_sequences") == 0)


# ---- queue bounds, remote down, model that does not load ----------------------------------


def test_full_queue_refuses_background_with_429_and_keeps_critical(work, model_path):
    inject = work / "pressure-small.json"
    inject.write_text("{}")
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: the remote is down
    small = start_server(work, {
        "model": str(model_path), "model_name": "tiny",
        "scheduler": {"max_batch": 1, "max_queue": 3, "background_queue": 1,
                      "critical_reserve": 2, "retry_after_s": 3},
        "offload": offload_section(work, dead), "monitor": monitor_section(inject)},
        name="small")
    try:
        async def one(http, priority):
            r = await http.post("/completions", json={
                "model": "tiny", "prompt": "queue", "max_tokens": 40, "priority": priority})
            return priority, r.status_code, r.headers.get("retry-after"), r.json()

        async def burst():
            async with httpx.AsyncClient(base_url=small.v1, timeout=60) as http:
                jobs = [one(http, "background") for _ in range(8)] + \
                    [one(http, "critical") for _ in range(3)]
                return await asyncio.gather(*jobs)

        results = asyncio.run(burst())
        refused = [r for r in results if r[1] == 429]
        assert refused and all(p == "background" and ra == "3" and
                               body["error"]["code"] == "queue_full"
                               for p, _, ra, body in refused)
        assert all(s == 200 for p, s, _, _ in results if p == "critical")
        assert all(s in (200, 429) for _, s, _, _ in results)

        # The remote is down: under pressure, normal work still gets a local answer.
        inject.write_text(json.dumps({"mem_available_fraction": 0.001}))
        wait_until(lambda: httpx.get(small.url + "/health").json()["pressure"])
        r = httpx.post(small.v1 + "/completions", timeout=30,
                       json={"model": "tiny", "prompt": "down", "max_tokens": 3})
        assert r.status_code == 200 and r.headers["x-claw-route"] == "offload"
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert small.metric("claw_offload_decisions_total", decision="fallback") == 1
        assert "ConnectError" in small.logs()
    finally:
        small.stop()


def test_model_that_fails_to_load_serves_only_through_the_remote(work, proxy):
    set_fault(proxy, "pass")
    broken = work / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    inject = work / "pressure-broken.json"
    inject.write_text("{}")
    p = start_server(work, {"model": str(broken), "model_name": "tiny",
                            "offload": offload_section(work, proxy.v1),
                            "monitor": monitor_section(inject)}, name="broken",
                     wait_status=503, env={"CLAW_API_KEY": KEY})
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        assert httpx.get(p.v1 + "/models").status_code == 401  # the key came from CLAW_API_KEY
        health = wait_until(lambda: (h := httpx.get(p.url + "/health")).json()["status"]
                            == "error" and h)
        assert health.status_code == 503 and "broken.gguf" in health.json()["error"]
        crit = httpx.post(p.v1 + "/chat/completions", headers=auth, json={
            "model": "tiny", "messages": HI, "max_tokens": 3, "priority": "critical"})
        assert crit.status_code == 503 and crit.headers["retry-after"] == "2"
        assert crit.json()["error"]["code"] == "model_not_loaded"
        normal = httpx.post(p.v1 + "/chat/completions", timeout=30, headers=auth,
                            json={"model": "tiny", "messages": HI, "max_tokens": 3})
        assert normal.status_code == 200 and normal.headers["x-claw-route"] == "offload"
    finally:
        p.stop()


# ---- everything at once ---------------------------------------------------------------------


def test_mixed_load_with_faults_loses_nothing(edge, proxy):
    """200+ requests of all priorities, streaming and not, while pressure flips on and off
    and the remote fails in every way: each gets a whole answer or an explicit refusal."""
    rng = random.Random(11)
    plan = [(rng.choice(["critical", "normal", "normal", "background"]), rng.random() < 0.5,
             rng.random() < 0.5, rng.randint(2, 8), rng.random() < 0.1) for _ in range(220)]
    base = {k: edge.metric("claw_requests_total", **({"priority": k} if k != "all" else {}))
            for k in ("all", "critical")}
    crit_offloaded = sum(edge.metric("claw_requests_total", priority="critical", route=r)
                         for r in ("offload", "fallback"))
    set_fault(proxy, "mixed")
    stop = threading.Event()

    def flip():
        on = False
        while not stop.wait(0.4):
            on = not on
            edge.inject.write_text(json.dumps({"psi_some_avg10": 99.0} if on else {}))

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()

    async def one(http, sem, priority, stream, chat, n, leave):
        """One request; `leave`: a streaming client that hangs up after the first event."""
        body = {"model": "tiny", "max_tokens": n * (10 if leave else 1), "stream": stream,
                "priority": priority}
        body.update({"messages": HI} if chat else {"prompt": "Edge devices"})
        async with sem:
            if not stream:
                r = await http.post("chat/completions" if chat else "completions", json=body)
                ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"]
                return priority, r.status_code, r.headers, ok
            async with http.stream("POST", "chat/completions" if chat else "completions",
                                   json=body) as r:
                if leave and r.status_code == 200:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            return priority, r.status_code, r.headers, True
                text = (await r.aread()).decode()
            events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
            finishes = [c for e in events[:-1] for c in json.loads(e).get("choices", [])
                        if c.get("finish_reason")]
            ok = r.status_code == 200 and events[-1] == "[DONE]" and len(finishes) == 1
            return priority, r.status_code, r.headers, ok

    async def run_all():
        sem = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=edge.v1 + "/", timeout=120,
                                     headers={"Authorization": f"Bearer {KEY}"}) as http:
            return await asyncio.gather(*(one(http, sem, *p) for p in plan))

    try:
        results = asyncio.run(run_all())
    finally:
        stop.set()
        flipper.join()
        set_fault(proxy, "pass")
        pressure(edge, False)
    lost = [(p, s) for p, s, h, ok in results
            if not (ok or (s in (429, 503) and h.get("retry-after")))]
    assert not lost, lost
    assert not [1 for p, s, h, _ in results if p == "critical" and
                h.get("x-claw-route") != "local"]
    routes = {h.get("x-claw-route") for _, s, h, _ in results if s == 200}
    assert routes == {"local", "offload"}
    stats = httpx.get(proxy.url + "/_stats").json()["served"]
    assert all(stats[m] > 0 for m in ("500", "slow", "cut")), stats
    assert edge.metric("claw_requests_total") - base["all"] == len(plan)
    assert sum(edge.metric("claw_requests_total", priority="critical", route=r)
               for r in ("offload", "fallback")) == crit_offloaded == 0
    assert edge.metric("claw_requests_total", route="fallback") > 0
    wait_until(lambda: edge.metric("claw_active_sequences") == 0
               and edge.metric("claw_queue_depth") == 0
               and edge.metric("claw_offload_inflight") == 0, timeout=20)
    time.sleep(0)
