"""The dashboard's web application: FastAPI routes rendering Jinja2 templates.

Pages read three sources: the inventory (which devices exist, their profiles), the rollout
history (fleet.db, written by every `claw fleet rollout|rollback`, from the page or a shell),
and the dashboard's own samples of each runtime's /health and /metrics. A running rollout is
streamed to the page as server-sent events by polling its history rows.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from provision.dashboard import benchdata, charts, store
from provision.dashboard.auth import COOKIE, Auth, AuthError
from provision.dashboard.jobs import Jobs
from provision.dashboard.sampler import Sampler, Target
from provision.errors import BadInput, ClawError
from provision.fleet import history
from provision.inventory import Inventory

HERE = Path(__file__).parent
SORTABLE = ("name", "profile", "online", "release", "health", "mem_used", "zram_mib",
            "last_outcome")
OUTCOME_CLASS = {"ok": "good", "current": "good", "succeeded": "good", "rolled_back": "warn",
                 "halted": "warn", "interrupted": "warn", "failed": "bad", "unreachable": "bad",
                 "skipped": "dim", "pending": "", "running": "live"}
ACTIONS = ("rollout", "rollback", "provision")


@dataclass
class Config:
    inventory: Inventory
    auth: Auth
    sample_interval: float = 5.0  # 0: no sampling thread (tests feed the store themselves)
    results: Path | None = None  # bench/RESULTS.md
    samples_db: Path | None = None


def targets(inventory: Inventory) -> list[Target]:
    out = []
    for name, host in inventory.hosts.items():
        s = host.settings
        if s is None:
            continue
        address = s.ansible_host or ("127.0.0.1" if s.ansible_connection == "local" else name)
        out.append(Target(name, f"http://{address}:{s.claw_runtime_port or 8080}"))
    return out


def _bad(detail: str, status: int = 400) -> HTTPException:
    return HTTPException(status, detail)


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.strip().isdigit() or not lo <= int(raw) <= hi:
        raise _bad(f"query parameter {name}={raw!r} is not valid (expected a whole number "
                   f"from {lo} to {hi})")
    return int(raw)


def provisioning_runs(device: str) -> list[dict[str, Any]]:
    """`claw provision` runs that reached this device: each run keeps a summary.json."""
    from provision.paths import state_dir

    out = []
    for summary in sorted((state_dir() / "runs").glob("*provision-*/summary.json"), reverse=True):
        try:
            data = json.loads(summary.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for host in data.get("hosts", []):
            if host.get("host") == device:
                out.append({"run_id": data.get("run_id", summary.parent.name),
                            "check": data.get("check"), "tags": ",".join(data.get("tags") or []),
                            "artifacts": str(summary.parent), **host})
        if len(out) >= 20:
            break
    return out


def device_rows(cfg: Config) -> list[dict[str, Any]]:
    samples = store.latest(cfg.samples_db)
    last = history.last_per_device()
    rel = history.releases_per_device()
    stale = max(3 * cfg.sample_interval, 30.0)
    rows = []
    for name, host in cfg.inventory.hosts.items():
        s, prev = samples.get(name), last.get(name, {})
        online = bool(s and s["online"] and time.time() - s["t"] < stale)
        mem_used = (1 - s["mem_available"] / s["mem_total"]) if s and s["mem_total"] and \
            s["mem_available"] is not None else None
        rows.append({
            "name": name, "profile": host.profile.name if host.profile else "",
            "online": online, "health": (s["health"] if s else "not sampled yet"),
            "release": rel.get(name, {}).get("to_image", ""),
            "mem_used": mem_used,
            "zram_mib": s["zram_used"] / 2**20 if s and s["zram_used"] is not None else None,
            "last_outcome": prev.get("outcome", ""), "last_rollout": prev.get("rollout_id", ""),
            "sampled": s["t"] if s else None, "error": s["error"] if s else "",
        })
    return rows


def _sort_key(column: str):
    def key(row: dict[str, Any]) -> tuple:
        v = row[column]
        return (v is None or v == "", v if v is not None else 0)
    return key


def rollout_view(row: dict[str, Any]) -> dict[str, Any]:
    """A rollout for the page and its event stream: devices by batch, counts, seconds."""
    counts: dict[str, int] = {}
    for d in row["devices"]:
        counts[d["outcome"]] = counts.get(d["outcome"], 0) + 1
        d["seconds"] = round(d["ended"] - d["started"], 1) if d["started"] and d["ended"] \
            else None
    done = sum(v for k, v in counts.items() if k in history.FINAL)
    return {**row, "counts": counts, "done": done, "total": len(row["devices"]),
            "batches": sorted({d["batch"] for d in row["devices"]}),
            "seconds": round((row["ended"] or time.time()) - row["started"], 1)}


def create_app(cfg: Config) -> FastAPI:
    jobs = Jobs()
    sampler = Sampler(lambda: targets(cfg.inventory), cfg.sample_interval, cfg.samples_db) \
        if cfg.sample_interval > 0 else None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if sampler is not None:
            sampler.thread.start()
        yield
        if sampler is not None:
            sampler.stop.set()
        await run_in_threadpool(jobs.stop_all)

    app = FastAPI(title="ClawForge fleet dashboard", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.jobs, app.state.sampler, app.state.cfg = jobs, sampler, cfg
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    env = templates.env
    env.globals.update(outcome_class=lambda v: OUTCOME_CLASS.get(v, ""), inventory=cfg.inventory)
    env.filters["when"] = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) \
        if t else ""
    env.filters["pct"] = lambda v: f"{v:.0%}" if v is not None else "–"
    env.filters["num"] = lambda v, f=".1f": format(v, f) if v is not None else "–"

    def page(request: Request, name: str, code: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("title", name.removesuffix(".html"))
        return templates.TemplateResponse(request, name, context, status_code=code)

    def error_page(request: Request, status: int, message: str) -> HTMLResponse:
        return page(request, "error.html", status, title=f"{status}", status=status,
                    message=message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> HTMLResponse:
        return error_page(request, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> HTMLResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_page(request, 400, f"{where}: {first.get('msg', 'not valid')}")

    @app.exception_handler(AuthError)
    async def auth_error(request: Request, exc: AuthError) -> HTMLResponse:
        return page(request, "login.html", exc.status, title="token needed", message=str(exc),
                    next=request.url.path)

    @app.exception_handler(BadInput)
    async def bad_input(request: Request, exc: BadInput) -> HTMLResponse:
        return error_page(request, 400, str(exc))

    @app.exception_handler(ClawError)
    async def claw_error(request: Request, exc: ClawError) -> HTMLResponse:
        return error_page(request, 409, str(exc))

    def authorize(request: Request, given: str | None = None) -> None:
        bearer = request.headers.get("authorization", "")
        if bearer.lower().startswith("bearer "):
            given = given or bearer[7:].strip()
        cfg.auth.check(given, request.cookies.get(COOKIE))

    @app.middleware("http")
    async def pages_need_token(request: Request, call_next):
        path = request.url.path
        if not cfg.auth.pages_open and not path.startswith(("/static/", "/login")):
            try:
                authorize(request)
            except AuthError as exc:
                return await auth_error(request, exc)
        return await call_next(request)

    def logged_in(nxt: str) -> RedirectResponse:
        # only a path on this site: never an open redirect to another
        safe = nxt if nxt.startswith("/") and not nxt.startswith("//") else "/"
        response = RedirectResponse(safe, status_code=303)
        # the browser keeps the cookie a day past the session, so the page can say "expired"
        response.set_cookie(COOKIE, cfg.auth.cookie(), max_age=int(cfg.auth.session_s) + 86400,
                            httponly=True, samesite="strict")
        return response

    @app.get("/login", response_model=None)
    async def login_get(request: Request) -> HTMLResponse | RedirectResponse:
        token = request.query_params.get("token")
        if token is None:
            return page(request, "login.html", title="token", message="",
                        next=request.query_params.get("next", "/"))
        authorize(request, token)
        return logged_in(request.query_params.get("next") or "/")

    @app.post("/login")
    async def login_post(request: Request) -> RedirectResponse:
        form = await request.form()
        authorize(request, str(form.get("token", "")) or None)
        return logged_in(str(form.get("next") or "/"))

    @app.get("/")
    async def index() -> RedirectResponse:
        return RedirectResponse("/devices", status_code=303)

    def sorted_rows(request: Request) -> tuple[list[dict[str, Any]], str, str, str]:
        sort = request.query_params.get("sort", "name")
        order = request.query_params.get("order", "asc")
        q = request.query_params.get("q", "")
        if sort not in SORTABLE:
            raise _bad(f"query parameter sort={sort!r} is not valid (expected one of: "
                       f"{', '.join(SORTABLE)})")
        if order not in ("asc", "desc"):
            raise _bad(f"query parameter order={order!r} is not valid (expected asc or desc)")
        if len(q) > 200:
            raise _bad("query parameter q is too long (expected at most 200 characters)")
        rows = device_rows(cfg)
        if q:
            rows = [r for r in rows if any(q.lower() in str(v).lower() for v in r.values())]
        rows.sort(key=_sort_key(sort), reverse=order == "desc")
        return rows, sort, order, q

    @app.get("/devices", response_class=HTMLResponse)
    async def devices(request: Request) -> HTMLResponse:
        rows, sort, order, q = await run_in_threadpool(sorted_rows, request)
        return page(request, "devices.html", title="Devices", rows=rows, sort=sort,
                    order=order, q=q, columns=SORTABLE)

    @app.get("/api/devices")
    async def devices_json(request: Request) -> JSONResponse:
        rows, *_ = await run_in_threadpool(sorted_rows, request)
        return JSONResponse(rows)

    def known(name: str) -> Any:
        host = cfg.inventory.hosts.get(name)
        if host is None:
            raise _bad(f"device {name!r} is not in {cfg.inventory.path}", 404)
        return host

    @app.get("/devices/{name}", response_class=HTMLResponse)
    async def device(request: Request, name: str) -> HTMLResponse:
        host = known(name)
        minutes = _int_param(request, "minutes", 60, 1, 24 * 60)
        row = next(r for r in await run_in_threadpool(device_rows, cfg) if r["name"] == name)
        samples = await run_in_threadpool(store.since, name, minutes * 60, cfg.samples_db)
        now = time.time()
        return page(request, "device.html", title=name, host=host, row=row, minutes=minutes,
                    charts=charts.runtime_charts(samples, now - minutes * 60, now),
                    n_samples=len(samples), W=charts.W, H=charts.H, PAD=charts.PAD,
                    rollouts=await run_in_threadpool(history.device_rollouts, name),
                    provisions=await run_in_threadpool(provisioning_runs, name))

    @app.get("/rollouts", response_class=HTMLResponse)
    async def rollouts(request: Request) -> HTMLResponse:
        limit = _int_param(request, "limit", 20, 1, 500)
        rows = [rollout_view(r) for r in await run_in_threadpool(history.rollouts, limit)]
        return page(request, "rollouts.html", title="Rollouts", rows=rows, limit=limit,
                    job=jobs.running())

    def get_rollout(rollout_id: str) -> dict[str, Any]:
        if not rollout_id.replace("-", "").isalnum() or len(rollout_id) > 80:
            raise _bad(f"rollout id {rollout_id!r} is not valid (expected an id from the "
                       "rollouts page)")
        try:
            return rollout_view(history.get(rollout_id))
        except BadInput:
            raise _bad(f"rollout {rollout_id!r} is not in the history", 404) from None

    @app.get("/rollouts/{rollout_id}", response_class=HTMLResponse)
    async def rollout(request: Request, rollout_id: str) -> HTMLResponse:
        row = await run_in_threadpool(get_rollout, rollout_id)
        return page(request, "rollout.html", title=f"Rollout {row['id']}", r=row)

    @app.get("/rollouts/{rollout_id}/events")
    async def rollout_events(request: Request, rollout_id: str) -> StreamingResponse:
        first = await run_in_threadpool(get_rollout, rollout_id)
        raw = request.query_params.get("poll", "0.5")
        try:
            poll = float(raw)
        except ValueError:
            poll = -1.0
        if not 0.1 <= poll <= 5.0:
            raise _bad(f"query parameter poll={raw!r} is not valid (expected seconds from 0.1 "
                       "to 5)")

        async def stream() -> AsyncIterator[str]:
            row, sent = first, ""
            while True:
                body = json.dumps({k: row[k] for k in ("id", "status", "error", "stopped_at",
                                                       "devices", "counts", "done", "total",
                                                       "seconds")}, default=str)
                if body != sent:
                    yield f"data: {body}\n\n"
                    sent = body
                if row["status"] != "running":
                    yield "event: end\ndata: {}\n\n"
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(poll)
                row = await run_in_threadpool(get_rollout, rollout_id)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    @app.get("/actions/{kind}", response_class=HTMLResponse)
    async def action_form(request: Request, kind: str) -> HTMLResponse:
        if kind not in ACTIONS:
            raise _bad(f"no action {kind!r} (expected one of: {', '.join(ACTIONS)})", 404)
        device_name = request.query_params.get("device", "")
        if device_name:
            known(device_name)
        return page(request, "action.html", title=f"Confirm {kind}", kind=kind,
                    device=device_name, rollout=request.query_params.get("rollout", ""),
                    busy=jobs.running(), images=await run_in_threadpool(local_images))

    @app.post("/actions/{kind}")
    async def action(request: Request, kind: str) -> RedirectResponse:
        if kind not in ACTIONS:
            raise _bad(f"no action {kind!r} (expected one of: {', '.join(ACTIONS)})", 404)
        form = {k: str(v).strip() for k, v in (await request.form()).items()}
        authorize(request, form.get("token") or None)
        if form.get("confirm") != "yes":
            raise _bad("the action was not confirmed (tick the confirmation box)")
        argv = action_argv(kind, form, cfg)
        job = await run_in_threadpool(jobs.start, kind, argv)
        return RedirectResponse(f"/jobs/{job.id}", status_code=303)

    def get_job(job_id: str) -> Any:
        job = jobs.get(job_id)
        if job is None:
            raise _bad(f"no job {job_id!r} in this dashboard's life", 404)
        return job

    @app.get("/jobs/{job_id}.json")
    async def job_json(job_id: str) -> JSONResponse:
        return JSONResponse(await run_in_threadpool(get_job(job_id).summary))

    @app.get("/jobs/{job_id}", response_class=HTMLResponse)
    async def job_page(request: Request, job_id: str) -> HTMLResponse:
        job = await run_in_threadpool(get_job(job_id).summary)
        return page(request, "job.html", title=f"{job['kind']} job", job=job)

    @app.get("/bench", response_class=HTMLResponse)
    async def bench(request: Request) -> HTMLResponse:
        path = cfg.results or benchdata.default_results()
        tables = benchdata.load(path)
        return page(request, "bench.html", title="Benchmarks", tables=tables, path=path)

    return app


def local_images() -> list[str]:
    """Runtime image tags on this machine, offered in the rollout form (none without Docker)."""
    try:
        from images.base import docker_client

        tags = [t for img in docker_client().images.list() for t in img.tags]
    except Exception:  # no engine, no SDK: the form still takes a typed tag
        return []
    return sorted(t for t in tags if "runtime" in t)[:50]


def action_argv(kind: str, form: dict[str, str], cfg: Config) -> list[str]:
    """The `claw` command line for an action, its inputs checked here first (400 page) so a
    mistyped field is not discovered by a subprocess."""
    from provision.fleet.plan import parse_batch, parse_max_fail

    inv = ["-i", str(cfg.inventory.path)]
    limit = form.get("limit", "")
    if limit:
        from provision.provisioning import limit_hosts

        limit_hosts(cfg.inventory, limit)  # an unknown device or group: BadInput, a 400 page
    lim = ["--limit", limit] if limit else []
    if kind == "rollout":
        image = form.get("image", "")
        if not image or " " in image:
            raise _bad(f"image: {image!r} is not valid (expected an image tag)")
        canary = form.get("canary", "1")
        if not canary.isdigit():
            raise _bad(f"canary: {canary!r} is not valid (expected 0 or more devices)")
        batch = parse_batch(form.get("batch") or "25%")
        max_fail = parse_max_fail(form.get("max_fail") or "10%")
        return ["fleet", "rollout", *inv, "--image", image, "--canary", canary, "--batch",
                batch, "--max-fail", f"{max_fail}%", *lim]
    if kind == "rollback":
        extra = []
        if form.get("to"):
            extra = ["--to", form["to"]]
        elif form.get("rollout"):
            extra = ["--rollout", form["rollout"]]
        return ["fleet", "rollback", *inv, *extra, *lim]
    tags = form.get("tags", "")
    if tags:
        from provision.provisioning import check_tags

        check_tags([t.strip() for t in tags.split(",") if t.strip()])
    return ["provision", *inv, *lim, *(["--tags", tags] if tags else [])]
