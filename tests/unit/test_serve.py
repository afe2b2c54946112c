"""The server's parts without the network: config validation, the monitor's readers and its
hysteresis, batched decode against one-by-one decode, and the scheduler's priorities and
bounds."""

from __future__ import annotations

import asyncio
import json
import textwrap

import numpy as np
import pytest

from provision.errors import BadInput
from runtime.server.config import load_config
from runtime.server.monitor import (
    PressureMonitor,
    Reading,
    Thresholds,
    over,
    own_cgroup,
    read_cgroup,
    read_meminfo,
    read_psi,
    sample,
    thresholds_for,
)

pytestmark = pytest.mark.unit


def write(tmp_path, text: str):
    path = tmp_path / "runtime.yml"
    path.write_text(textwrap.dedent(text))
    return path


def problems(tmp_path, text: str) -> str:
    with pytest.raises(BadInput) as err:
        load_config(write(tmp_path, text))
    return str(err.value)


def test_a_full_config_loads_and_flags_override_it(tmp_path):
    path = write(tmp_path, """\
        model: /models/m.gguf
        host: 0.0.0.0
        port: 9000
        backend: numpy
        scheduler: {max_batch: 8, max_queue: 10}
        offload: {enabled: true, url: "http://cloud:8000/v1", model: big, retries: 3}
        monitor: {profile: rk3588, hold_s: 2}
        """)
    cfg = load_config(path, port=9100, host=None)
    assert (cfg.port, cfg.host, cfg.backend, str(cfg.model)) == (9100, "0.0.0.0", "numpy",
                                                                  "/models/m.gguf")
    assert cfg.scheduler.background_queue == 5 and cfg.offload.retries == 3
    assert cfg.served_name() == "m"
    t = thresholds_for(cfg.monitor)
    assert (t.psi_some_avg10, t.mem_available_min_fraction, t.hold_s) == (10.0, 0.15, 2)


def test_offload_api_key_from_env_or_file(tmp_path, monkeypatch):
    key = tmp_path / "cloud.key"
    key.write_text("sk-file\n")
    cfg = load_config(write(tmp_path, f"""\
        offload: {{enabled: true, url: "http://c:1/v1", api_key_file: {key},
                   api_key_env: CLOUD_KEY}}
        """))
    monkeypatch.delenv("CLOUD_KEY", raising=False)
    assert cfg.offload.api_key() == "sk-file"
    monkeypatch.setenv("CLOUD_KEY", "sk-env")
    assert cfg.offload.api_key() == "sk-env"
    key.write_text("")
    monkeypatch.delenv("CLOUD_KEY")
    with pytest.raises(ValueError, match=r"offload\.api_key_file: .* is empty"):
        cfg.offload.api_key()


@pytest.mark.parametrize(("text", "expected"), [
    ("port: '80'\n", "runtime.yml:1: port: '80' is not valid (expected a valid integer)"),
    ("port: 70000\n", "port: 70000 is not valid"),
    ("schedular: {}\n", "runtime.yml:1: schedular: unknown field"),
    ("scheduler:\n  max_batch: 0\n", "runtime.yml:2: scheduler.max_batch: 0 is not valid"),
    ("scheduler: {max_queue: 4, background_queue: 9}\n",
     "scheduler.background_queue: 9 exceeds max_queue 4"),
    ("offload: {enabled: true}\n", "offload.url: missing"),
    ("offload: {url: 'ftp://x'}\n", "offload.url: 'ftp://x' is not valid"),
    ("backend: cuda\n", "backend: 'cuda' is not valid"),
    ("monitor:\n  profile: rk3589\n", "runtime.yml:2: monitor.profile: unknown profile "
     "'rk3589'"),
    ("monitor: {mem_available_min_fraction: 2}\n", "monitor.mem_available_min_fraction: 2"),
    ("- a list\n", "expected a mapping of fields"),
])
def test_bad_config_names_the_field(tmp_path, text, expected):
    assert expected in problems(tmp_path, text)


def test_serve_with_a_bad_config_exits_2_with_one_line(tmp_path, claw):
    result = claw("runtime", "serve", "--config", str(write(tmp_path, "port: many\n")))
    assert result.code == 2
    assert "runtime.yml:1: port: 'many' is not valid" in result.err
    assert "Traceback" not in result.err + result.out
    missing = claw("runtime", "serve", "--config", str(tmp_path / "nope.yml"))
    assert missing.code == 2 and "runtime config not found" in missing.err
    no_model = claw("runtime", "serve", "--port", "0")
    assert no_model.code == 2 and "no model to serve (expected MODEL" in no_model.err


# ---- the monitor --------------------------------------------------------------------------


def test_readers_parse_the_kernel_files(tmp_path):
    proc = tmp_path / "proc"
    (proc / "pressure").mkdir(parents=True)
    (proc / "pressure" / "memory").write_text(
        "some avg10=12.50 avg60=3.00 avg300=1.00 total=123\n"
        "full avg10=1.00 avg60=0.00 avg300=0.00 total=5\n")
    (proc / "meminfo").write_text("MemTotal:  1000 kB\nMemAvailable:  250 kB\n"
                                  "SwapTotal: 0 kB\nHugePages_Total: 4\n")
    assert read_psi(proc / "pressure" / "memory") == 12.5
    assert read_meminfo(proc) == {"MemTotal": 1024000, "MemAvailable": 256000,
                                  "SwapTotal": 0, "HugePages_Total": 4}
    assert read_psi(tmp_path / "no-such") is None

    mount = tmp_path / "cg"
    v1 = mount / "memory" / "claw"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("1000\n")
    (v1 / "memory.usage_in_bytes").write_text("900\n")
    (v1 / "memory.stat").write_text("cache 300\ntotal_inactive_file 100\n")
    (proc / "self-cgroup").write_text("5:cpu:/\n4:memory:/claw\n0::/\n")
    where = own_cgroup(proc / "self-cgroup", mount)
    assert where == (1, v1, mount / "memory")
    cg = read_cgroup(where)
    assert (cg.version, cg.limit, cg.usage) == (1, 1000, 800)
    (v1 / "memory.limit_in_bytes").write_text(str(2**63 - 4096))
    assert read_cgroup(where).limit is None

    # v2, a service with no limit of its own inside a slice that has one: the slice counts.
    slice_, svc = mount / "claw.slice", mount / "claw.slice" / "claw-runtime.service"
    svc.mkdir(parents=True)
    for level, limit, current in ((mount, None, 9000), (slice_, "1000", 900),
                                  (svc, "max", 500)):
        if limit:
            (level / "memory.max").write_text(limit + "\n")
        (level / "memory.current").write_text(f"{current}\n")
        (level / "memory.stat").write_text("inactive_file 50\n")
    (proc / "self-cgroup").write_text("0::/claw.slice/claw-runtime.service\n")
    where = own_cgroup(proc / "self-cgroup", mount)
    assert where == (2, svc, mount)
    cg = read_cgroup(where)
    assert (cg.path, cg.limit, cg.usage) == (slice_, 1000, 850)
    (svc / "memory.pressure").write_text("some avg10=42.00 avg60=1.00 avg300=0.00 total=9\n")
    reading = sample(where)
    assert reading.psi_some_avg10 >= 42.0  # the container's own stalls, or the machine's
    assert (reading.cgroup_limit, reading.cgroup_usage) == (1000, 850)
    assert reading.mem_available_fraction <= 150 / 1000
    (slice_ / "memory.max").write_text("max\n")
    cg = read_cgroup(where)
    assert (cg.path, cg.limit, cg.usage) == (svc, None, 450)


def test_every_signal_can_trip_pressure():
    t = Thresholds(psi_some_avg10=10, mem_available_min_fraction=0.2,
                   cgroup_usage_max_fraction=0.9, swap_used_max_fraction=0.5,
                   gpu_memory_max_fraction=0.8)
    assert over(Reading(psi_some_avg10=0.0, mem_available_fraction=0.9), t) == []
    for change, word in [({"psi_some_avg10": 11.0}, "psi"),
                         ({"mem_available_fraction": 0.1}, "available memory"),
                         ({"cgroup_usage_fraction": 0.95}, "cgroup usage"),
                         ({"swap_used_fraction": 0.6}, "swap used"),
                         ({"gpu_memory_fraction": 0.85}, "OpenCL memory")]:
        r = Reading(**{"psi_some_avg10": 0.0, "mem_available_fraction": 0.9, **change})
        reasons = over(r, t)
        assert len(reasons) == 1 and reasons[0].startswith(word)


def test_pressure_has_hysteresis_and_a_hold_time(tmp_path):
    inject = tmp_path / "inject.json"
    inject.write_text("{}")
    changes = []
    m = PressureMonitor(Thresholds(psi_some_avg10=10, mem_available_min_fraction=0.01,
                                   cgroup_usage_max_fraction=1.0, clear_ratio=0.5, hold_s=5),
                        inject_file=inject, on_change=lambda p, r: changes.append(p))
    m.cgroup = None  # this machine's own cgroup must not decide the test
    assert m.update(now=0) is False
    inject.write_text(json.dumps({"psi_some_avg10": 20, "mem_available_fraction": 0.5}))
    assert m.update(now=1) is True and m.reasons == ["psi some avg10 20.0 ≥ 10.0"]
    inject.write_text(json.dumps({"psi_some_avg10": 7, "mem_available_fraction": 0.5}))
    assert m.update(now=2) is True  # below 10 but above 0.5 × 10: not calm yet
    inject.write_text(json.dumps({"psi_some_avg10": 1, "mem_available_fraction": 0.5}))
    assert m.update(now=3) is True  # calm, but not for hold_s yet
    assert m.update(now=7.9) is True
    assert m.update(now=8.1) is False
    assert changes == [True, False] and m.reading.injected == ["psi_some_avg10",
                                                               "mem_available_fraction"]


# ---- batched decode and the scheduler ------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    pytest.importorskip("torch")
    from runtime.api import Model
    from tests.serve_model import tiny_chat_gguf

    return Model(tiny_chat_gguf(tmp_path_factory.mktemp("serve-unit")), backend="numpy")


def test_forward_batch_equals_one_sequence_at_a_time(model):
    from runtime.backends import Backend

    backend = model.backend
    prompts = [[5, 9, 33], [7], [100, 3, 3, 4, 8]]
    caches = [backend.new_cache(64) for _ in prompts]
    alone = [backend.new_cache(64) for _ in prompts]
    for p, c, a in zip(prompts, caches, alone, strict=True):
        backend.forward(p, c)
        backend.forward(p, a)
    tokens = [11, 12, 13]
    batched = backend.forward_batch(tokens, caches)
    one_by_one = np.concatenate([backend.forward([t], a) for t, a in
                                 zip(tokens, alone, strict=True)])
    assert batched.shape == (3, model.config.vocab_size)
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-4, atol=1e-4)
    assert [c.length for c in caches] == [4, 2, 6]
    default = Backend.forward_batch(backend, [1, 2, 3], alone)  # the interface's fallback
    np.testing.assert_allclose(default, backend.forward_batch([1, 2, 3], caches), rtol=1e-4,
                               atol=1e-4)


def test_generation_steps_equal_iteration(model):
    from runtime.sampling import SamplingParams

    params = SamplingParams(temperature=0.7, seed=5, max_tokens=12, stop=["e"])
    whole = "".join(model.generate("Fleet", params))
    gen = model.generate("Fleet", params)
    logits, pieces = gen.start(), []
    while not gen.done:
        pieces.append(gen.step(logits))
        if not gen.done:
            logits = model.backend.forward([gen.next_token], gen.cache)[-1]
    assert "".join(pieces) == whole == gen.result.text


def test_scheduler_orders_by_priority_bounds_the_queue_and_batches(model):
    from runtime.sampling import SamplingParams
    from runtime.server.scheduler import Done, Job, Refused, Scheduler

    async def run():
        loop = asyncio.get_running_loop()
        s = Scheduler(model, max_batch=2, max_queue=3, background_queue=1, critical_reserve=1,
                      retry_after_s=7)
        ids = model.tokenize("queue")

        def make(priority: str) -> Job:
            # The order the worker finishes jobs in, recorded in its own thread: the order the
            # asyncio side reads the results in depends on when each task wakes.
            job = Job(priority, ids, SamplingParams.greedy(max_tokens=4), loop)
            send = job.send

            def record(item, job=job, send=send):
                if isinstance(item, Done):
                    finished.append(job.priority)
                send(item)

            job.send = record
            return job

        finished: list[str] = []
        jobs = [make("background")]
        s.submit(jobs[0])
        with pytest.raises(Refused) as err:
            s.submit(make("background"))
        assert (err.value.status, err.value.retry_after) == (429, 7)
        jobs += [make("normal"), make("normal")]
        for j in jobs[1:]:
            s.submit(j)
        with pytest.raises(Refused):
            s.submit(make("normal"))
        jobs.append(make("critical"))
        s.submit(jobs[-1])
        with pytest.raises(Refused) as err:
            s.submit(make("critical"))
        assert err.value.status == 503
        forced = make("background")
        s.submit(forced, force=True)  # a remote's failure coming back is never refused
        jobs.append(forced)
        cancelled = jobs[2]
        s.cancel(cancelled)
        steps = []
        s.on_step = steps.append
        s.start()

        async def drain(job):
            while True:
                item = await job.out.get()
                if isinstance(item, Done):
                    return item.result

        results = await asyncio.gather(*(drain(j) for j in jobs if j is not cancelled))
        s.stop()
        return results, finished, steps, s

    results, finished, steps, s = asyncio.run(run())
    assert finished[0] == "critical" and finished[-1] == "background"
    assert all(r.completion_tokens >= 1 for r in results)
    assert max(steps) == 2  # two sequences advanced in one forward_batch
    assert s.active == 0 and s.depth() == 0


def test_critical_work_pauses_background_work_and_both_finish_whole(model):
    """A full batch of background work: a critical job takes a slot at once; the paused
    sequence later resumes from its cache and ends with exactly the text it would have had."""
    from runtime.sampling import SamplingParams
    from runtime.server.scheduler import Done, Job, Scheduler

    ids = model.tokenize("Background")
    params = SamplingParams.greedy(max_tokens=300)
    gen = model.generate(ids, params)
    alone = "".join(gen)
    # long enough to be caught running (it may end at the model's EOS before max_tokens)
    assert gen.result.completion_tokens >= 200

    async def run():
        loop = asyncio.get_running_loop()
        paused = []
        s = Scheduler(model, max_batch=1, max_queue=8, background_queue=8, critical_reserve=0,
                      retry_after_s=1, on_preempt=paused.append)
        s.start()
        background = Job("background", ids, params, loop)
        s.submit(background)
        first = await background.out.get()  # it is running
        critical = Job("critical", model.tokenize("Now"), SamplingParams.greedy(max_tokens=3),
                       loop)
        s.submit(critical)
        order, texts = [], {}

        async def drain(job, text):
            while True:
                item = await job.out.get()
                if isinstance(item, Done):
                    order.append(job.priority)
                    texts[job.priority] = text
                    return
                text += item

        await asyncio.gather(drain(background, first), drain(critical, ""))
        s.stop()
        return order, texts, paused

    order, texts, paused = asyncio.run(run())
    assert paused == ["background"] and order == ["critical", "background"]
    assert texts["background"] == alone


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_a_streamed_event_stays_one_line_whatever_the_text(kind):
    """A token may decode to U+2028, U+2029 or U+0085, which JSON leaves raw but line readers
    (str.splitlines, httpx's aiter_lines) split on: the event escapes them, and the text
    decodes back unchanged. (A CI run cut one completion event in two at such a token.)"""
    from runtime.server.protocol import chunk

    text = "a\u2028b\u0085c\u2029d\ne\r\tf é 中"
    event = chunk(kind, "id", "tiny", text=text)
    assert event.startswith("data: ") and event.endswith("\n\n")
    lines = event[:-2].splitlines()
    assert len(lines) == 1
    body = json.loads(lines[0][6:])
    got = body["choices"][0]["delta" if kind == "chat" else "text"]
    assert (got["content"] if kind == "chat" else got) == text
    assert "é 中" in event  # other text stays UTF-8, not \u-escaped
