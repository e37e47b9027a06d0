"""GET /dashboard (the page) and GET /dashboard/api/metrics (its JSON), mounted on the Router's FastAPI app.

    browser ──GET /dashboard──▶ static/dashboard.html (offline: hand-written SVG charts, no CDN)
            ──GET /dashboard/api/metrics?window_s=300[&since=UNIX]──▶ snapshot(window_s, since)
                                                                      (the collector actor's view)

`mount_dashboard(app, snapshot)` takes the data source as a callable so the same routes serve a
plain FastAPI app in tests (an in-process MetricsCollector) and the Serve Router (the actor).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Awaitable, Callable

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from mixquant_serve.dashboard.collector import DEFAULT_WINDOW_S, RETENTION_S, current_app_name, get_collector

PAGE_PATH = Path(__file__).parent / "static" / "dashboard.html"
SnapshotFn = Callable[[float, "float | None"], Awaitable[dict[str, Any]]]


def parse_window(window_s: str | None, since: str | None) -> tuple[float, float | None]:
    """The query's window_s (default DEFAULT_WINDOW_S, at most RETENTION_S) and since (Unix seconds); 400 otherwise."""
    try:
        window = float(window_s) if window_s is not None else DEFAULT_WINDOW_S
    except ValueError:
        raise HTTPException(400, f"window_s: expected a number of seconds, got {window_s!r}") from None
    if not math.isfinite(window) or not 0 < window <= RETENTION_S:
        raise HTTPException(400, f"window_s: must lie in (0, {RETENTION_S:g}], got {window_s}")
    if since is None:
        return window, None
    try:
        start = float(since)
    except ValueError:
        raise HTTPException(400, f"since: expected a Unix time in seconds, got {since!r}") from None
    if not math.isfinite(start) or start < 0:
        raise HTTPException(400, f"since: must be a Unix time in seconds, got {since}")
    return window, start


def mount_dashboard(app: FastAPI, snapshot: SnapshotFn) -> None:
    page = PAGE_PATH.read_text(encoding="utf-8")

    async def dashboard_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    async def dashboard_metrics(window_s: str | None = None, since: str | None = None) -> JSONResponse:
        window, start = parse_window(window_s, since)
        return JSONResponse(await snapshot(window, start), headers={"Cache-Control": "no-store"})

    app.add_api_route("/dashboard", dashboard_page, methods=["GET"])
    app.add_api_route("/dashboard/api/metrics", dashboard_metrics, methods=["GET"])


def collector_snapshot() -> SnapshotFn:
    """Inside a Serve replica: the snapshot of this application's collector actor (found on first use)."""
    handle: list[Any] = []

    async def snapshot(window_s: float, since: float | None) -> dict[str, Any]:
        if not handle:
            handle.append(get_collector(current_app_name()))
        return await handle[0].snapshot.remote(window_s, since)

    return snapshot
