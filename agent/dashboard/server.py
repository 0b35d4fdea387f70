"""The live dashboard's web application (aiohttp): read-only pages and JSON over a runs
directory, with server-sent events that tell an open page when its run has grown.

Everything is read from disk, the way ``outrider show`` reads it: the agent's receive loop
runs in another process and never waits on a page. A page learns of new records from an
event stream that only compares file sizes (twice a second), then asks for the points of
its charts again; those come downsampled on the server (min and max of each bucket), so
a run of a million steps costs a page a few thousand points.

Pages: ``/`` runs, ``/run?id=RUN``, ``/compare``, ``/alerts``, ``/export``; the page shell is
one HTML file and ``static/app.js`` draws each page with uPlot (vendored, MIT).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import math
import os
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from agent.dashboard.cache import RunCache, RunView, stored_size
from agent.reports import export
from agent.store.runs import JOBS_DIR, RunNotFound, list_runs, load_info, resolve
from agent.store.series import name_filter

STATIC = Path(str(resources.files("agent.dashboard") / "static"))
PAGES = ("/", "/run", "/compare", "/alerts", "/export")
#: how often an event stream looks at the run's file size
POLL_SECONDS = 0.5
#: a comment line on idle event streams, so proxies and browsers keep them open
KEEPALIVE_SECONDS = 15.0
#: an alert of a running run counts as active for this long after it fired
ACTIVE_SECONDS = 300.0
DEFAULT_BUCKETS = 500
MAX_BUCKETS = 5000
TOKEN_COOKIE = "outrider_token"
#: what the runs page shows as throughput, the first one a run logs
THROUGHPUT = ("tokens_per_second", "samples_per_second", "steps_per_second")
TAIL_BYTES = 256 << 10

RUNS_DIR = web.AppKey("runs_dir", Path)
CACHE = web.AppKey("cache", RunCache)
CLOSING = web.AppKey("closing", asyncio.Event)
READING = web.AppKey("reading", asyncio.Lock)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_app(runs_dir: Path, token: str | None = None) -> web.Application:
    """The dashboard over ``runs_dir``; with ``token`` every request must carry it."""
    app = web.Application(middlewares=[_token_middleware(token)] if token else [])
    app[RUNS_DIR] = Path(runs_dir).resolve()
    app[CACHE] = RunCache()
    app[CLOSING] = asyncio.Event()
    app[READING] = asyncio.Lock()

    async def closing(app: web.Application) -> None:
        app[CLOSING].set()

    app.on_shutdown.append(closing)
    for page in PAGES:
        app.router.add_get(page, _page)
    app.router.add_static("/static", STATIC)
    app.router.add_get("/api/runs", _runs)
    app.router.add_get("/api/run", _run)
    app.router.add_get("/api/series", _series)
    app.router.add_get("/api/compare", _compare)
    app.router.add_get("/api/alerts", _alerts)
    app.router.add_get("/api/events", _events)
    app.router.add_get("/api/image", _image)
    app.router.add_get("/download/export", _export)
    app.router.add_get("/download/report", _report)
    return app


def _token_middleware(token: str) -> Any:
    """The token may come as ``?token=``, ``Authorization: Bearer``, or the cookie that the
    first ``?token=`` request sets (so the page's own requests carry it)."""
    expected = token.encode()

    def matches(value: str | None) -> bool:
        return value is not None and hmac.compare_digest(value.encode(), expected)

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        bearer = request.headers.get("Authorization", "")
        from_query = request.query.get("token")
        if not (
            matches(from_query)
            or matches(bearer.removeprefix("Bearer ") if bearer.startswith("Bearer ") else None)
            or matches(request.cookies.get(TOKEN_COOKIE))
        ):
            raise web.HTTPUnauthorized(
                text="this dashboard needs its token: open it as /?token=TOKEN\n"
            )
        response = await handler(request)
        if matches(from_query) and not response.prepared:
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict")
        return response

    return check


def _json(data: Any) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


async def _page(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})


def _run_dir(request: web.Request, name: str | None = None) -> Path:
    """The run a request names (id, unique prefix or `latest`), never outside the runs dir."""
    runs_dir = request.app[RUNS_DIR]
    name = name if name is not None else request.query.get("run") or request.query.get("id")
    if not name:
        raise web.HTTPBadRequest(text="say which run: ?run=RUN\n")
    try:
        run_dir = resolve(runs_dir, name).resolve()
    except RunNotFound as exc:
        raise web.HTTPNotFound(text=f"{exc}\n") from None
    if not run_dir.is_relative_to(runs_dir):
        raise web.HTTPNotFound(text=f"no run {name!r}\n")
    return run_dir


def _run_id(request: web.Request, run_dir: Path) -> str:
    return run_dir.relative_to(request.app[RUNS_DIR]).as_posix()


async def _view(request: web.Request, run_dir: Path) -> RunView:
    """The run brought up to date, read on a worker thread so the event streams of other
    pages keep going while a long run is read the first time; one reader at a time."""
    async with request.app[READING]:
        return await asyncio.to_thread(request.app[CACHE].get, run_dir)


def _number(request: web.Request, key: str) -> float | None:
    raw = request.query.get(key)
    if raw in (None, "", "null"):
        return None
    try:
        value = float(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{key} must be a number, not {raw!r}\n") from None
    return value if math.isfinite(value) else None


def _buckets(request: web.Request) -> int:
    value = _number(request, "buckets")
    return DEFAULT_BUCKETS if value is None else int(min(max(value, 10), MAX_BUCKETS))


# -- runs -----------------------------------------------------------------------------------------
async def _runs(request: web.Request) -> web.Response:
    runs_dir = request.app[RUNS_DIR]
    rows = list_runs(runs_dir)
    for row in rows:
        run_dir = runs_dir / str(row["run_id"])
        row.update(_tail(run_dir))
        row["alerts"] = _alert_counts(_read_alerts(run_dir))
    return _json({"runs_dir": str(runs_dir), "runs": rows, "now": time.time()})


def _tail(run_dir: Path) -> dict[str, Any]:
    """The last step and throughput a run stored, from the end of its metrics file."""
    found: dict[str, Any] = {"last_step": None, "throughput": None, "throughput_unit": None}
    path = run_dir / "metrics.jsonl"
    try:
        with open(path, "rb") as file:
            size = file.seek(0, io.SEEK_END)
            file.seek(max(size - TAIL_BYTES, 0))
            chunk = file.read()
    except OSError:
        return found
    for line in reversed(
        chunk.splitlines()[1:] if len(chunk) == TAIL_BYTES else chunk.splitlines()
    ):
        if b'"scalars"' not in line:
            continue
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        metrics = entry.get("metrics") if isinstance(entry, dict) else None
        if not isinstance(metrics, dict):
            continue
        step = entry.get("step")
        if isinstance(step, int) and (found["last_step"] is None or step > found["last_step"]):
            found["last_step"] = step
        if found["throughput"] is None:
            for unit in THROUGHPUT:
                value = metrics.get(unit)
                if isinstance(value, (int, float)):
                    found["throughput"], found["throughput_unit"] = value, unit
                    break
    return found


def _read_alerts(run_dir: Path) -> list[dict[str, Any]]:
    try:
        raw = (run_dir / "alerts.jsonl").read_bytes()
    except OSError:
        return []
    alerts = []
    for line in raw.splitlines():
        try:
            alert = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(alert, dict):
            alerts.append(alert)
    return alerts


def _alert_counts(alerts: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for alert in alerts:
        severity = str(alert.get("severity", "?"))
        counts[severity] = counts.get(severity, 0) + 1
    return counts


# -- one run --------------------------------------------------------------------------------------
async def _run(request: web.Request) -> web.Response:
    run_dir = _run_dir(request)
    view = await _view(request, run_dir)
    try:
        info = load_info(run_dir)
    except (OSError, orjson.JSONDecodeError):
        info = {}
    latest_images: dict[str, dict[str, Any]] = {}
    for image in view.log.images:
        if isinstance(image.get("name"), str):
            latest_images[image["name"]] = {"name": image["name"], "step": image.get("step")}
    return _json(
        {
            "run_id": _run_id(request, run_dir),
            "info": info,
            "metrics": view.names(),
            "ranks": view.ranks(),
            "config": view.log.config(),
            "texts": [_text(t) for t in view.log.texts[-10:]],
            "images": sorted(latest_images.values(), key=lambda image: image["name"]),
            "alerts": [_alert(a) for a in view.log.alerts],
            "events": [_event(e) for e in view.log.events[-50:]],
            "size": stored_size(run_dir),
        }
    )


def _text(entry: dict[str, Any]) -> dict[str, Any]:
    return {"name": entry.get("name"), "step": entry.get("step"), "text": entry.get("text")}


def _alert(entry: dict[str, Any]) -> dict[str, Any]:
    keys = ("name", "severity", "message", "advice", "step", "rank", "t")
    return {key: entry.get(key) for key in keys}


def _event(entry: dict[str, Any]) -> dict[str, Any]:
    return {"name": entry.get("name"), "step": entry.get("step"), "t": entry.get("t")}


async def _series(request: web.Request) -> web.Response:
    run_dir = _run_dir(request)
    view = await _view(request, run_dir)
    names = request.query.getall("names", [])
    buckets = _buckets(request)
    lo, hi = _number(request, "lo"), _number(request, "hi")
    rank = _number(request, "rank")
    chosen = name_filter(names) if any("*" in n or "?" in n for n in names) else None
    wanted = [n for n in view.names() if chosen(n)] if chosen else names
    series = {}
    for name in wanted[:50]:
        one = view.series(name, buckets, lo, hi, None if rank is None else int(rank))
        if one is not None:
            series[name] = one
    return _json({"run_id": _run_id(request, run_dir), "series": series})


async def _compare(request: web.Request) -> web.Response:
    metric = request.query.get("metric")
    if not metric:
        raise web.HTTPBadRequest(text="say which metric: ?metric=NAME\n")
    buckets = _buckets(request)
    lo, hi = _number(request, "lo"), _number(request, "hi")
    series = {}
    for name in request.query.getall("runs", [])[:20]:
        run_dir = _run_dir(request, name)
        one = (await _view(request, run_dir)).series(metric, buckets, lo, hi)
        if one is not None:
            series[_run_id(request, run_dir)] = one
    return _json({"metric": metric, "series": series})


async def _alerts(request: web.Request) -> web.Response:
    """Every stored alert, newest first (at most 1,000), and which ones are active: fired in
    the last few minutes by a run that is still going."""
    runs_dir = request.app[RUNS_DIR]
    now = time.time()
    history: list[dict[str, Any]] = []
    for row in list_runs(runs_dir):
        running = row.get("status") == "running"
        for alert in _read_alerts(runs_dir / str(row["run_id"])):
            item = _alert(alert)
            item["run"] = row["run_id"]
            fired = alert.get("t")
            item["active"] = bool(
                running and isinstance(fired, (int, float)) and now - fired < ACTIVE_SECONDS
            )
            history.append(item)
    history.sort(key=lambda item: item.get("t") or 0, reverse=True)
    return _json(
        {
            "active": [item for item in history if item["active"]],
            "history": history[:1000],
            "total": len(history),
            "active_seconds": ACTIVE_SECONDS,
        }
    )


async def _image(request: web.Request) -> web.StreamResponse:
    run_dir = _run_dir(request)
    name = request.query.get("name")
    path = None
    for image in reversed((await _view(request, run_dir)).log.images):
        if image.get("name") == name and isinstance(image.get("path"), str):
            path = Path(image["path"]).resolve()
            break
    if path is None or not path.is_relative_to(run_dir) or not path.is_file():
        raise web.HTTPNotFound(text=f"no image {name!r} in run {run_dir.name}\n")
    return web.FileResponse(path, headers={"Cache-Control": "no-store"})


# -- live -----------------------------------------------------------------------------------------
async def _events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: ``grown`` with the new size whenever the run's metrics file (or,
    without ``run``, any run's) grows; the page then fetches what it draws."""
    run = request.query.get("run")
    runs_dir = request.app[RUNS_DIR]
    run_dir = _run_dir(request, run) if run else None

    def size() -> int:
        if run_dir is not None:
            return stored_size(run_dir)
        return _signature(runs_dir)

    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    closing = request.app[CLOSING]
    seen = size()
    await response.write(f"event: hello\ndata: {seen}\n\n".encode())
    quiet_since = time.monotonic()
    try:
        while not closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closing.wait(), POLL_SECONDS)
            now = size()
            if now != seen:
                seen = now
                await response.write(f"event: grown\ndata: {now}\n\n".encode())
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > KEEPALIVE_SECONDS:
                await response.write(b": keepalive\n\n")
                quiet_since = time.monotonic()
    except (ConnectionResetError, ConnectionError):
        pass
    return response


def _signature(runs_dir: Path) -> int:
    """A number that changes when any run (or job view) is added, grows or is rewritten:
    file sizes and times only, so a runs page costs no parsing while nothing happens."""
    total = 0
    for parent in (runs_dir, runs_dir / JOBS_DIR):
        try:
            entries = list(os.scandir(parent))
        except OSError:
            continue
        for entry in entries:
            path = Path(entry.path)
            total += stored_size(path) + _mtime_ns(path / "run.json")
    return total


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


# -- downloads ------------------------------------------------------------------------------------
async def _export(request: web.Request) -> web.StreamResponse:
    run_dir = _run_dir(request)
    fmt = request.query.get("format", "csv")
    layout = request.query.get("layout", "wide")
    if fmt not in export.FORMATS or layout not in export.LAYOUTS:
        raise web.HTTPBadRequest(
            text=f"format is one of {', '.join(export.FORMATS)}; "
            f"layout one of {', '.join(export.LAYOUTS)}\n"
        )
    patterns = [p for p in request.query.getall("metrics", []) if p]
    rank = _number(request, "rank")
    data = await asyncio.to_thread(_export_bytes, run_dir, fmt, layout, patterns, rank)
    run_id = _run_id(request, run_dir).replace("/", "-")
    media = {"csv": "text/csv", "json": "application/json"}.get(fmt, "application/octet-stream")
    return web.Response(
        body=data,
        content_type=media,
        headers={"Content-Disposition": f'attachment; filename="{run_id}.{fmt}"'},
    )


def _export_bytes(
    run_dir: Path, fmt: Any, layout: Any, patterns: list[str], rank: float | None
) -> bytes:
    from agent.store.series import RunLog

    log = RunLog.read(run_dir, name_filter(patterns))
    out = io.BytesIO()
    try:
        export.write(export.table(log, layout, None if rank is None else int(rank)), fmt, out)
    except export.ExportError as exc:
        raise web.HTTPNotImplemented(text=f"{exc}\n") from None
    return out.getvalue()


async def _report(request: web.Request) -> web.StreamResponse:
    from agent.reports.report import render_html  # matplotlib: only when a report is asked

    run_dir = _run_dir(request)
    html = await asyncio.to_thread(render_html, run_dir)
    run_id = _run_id(request, run_dir).replace("/", "-")
    return web.Response(
        text=html,
        content_type="text/html",
        headers={"Content-Disposition": f'attachment; filename="{run_id}-report.html"'},
    )
