"""The dashboard on the real CPU default app: `mixquant load` sessions, then the cluster-wide API, the
Prometheus export behind the Grafana dashboard, and the page in a real headless Chromium.

Uses the shared `default_app` (one replica per pool; no app of its own). One short load run for
the module (2 sessions x 3 turns, 8 output tokens each); ~1 min on 2 cores once the app is up.
The screenshot is written under pytest's tmp dir and its path printed (`-s` shows it).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from mixquant_serve.loadgen.report import summarize
from mixquant_serve.loadgen.runner import LoadConfig, run_load
from mixquant_serve.metrics import METRICS, exported_series_names

pytestmark = pytest.mark.slow
GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "mixquant.json"
APP_NAME = "mixquant"  # the default_app fixture's application
POOL_DEPLOYMENTS = {"router": "Router", "decode": "DecodeWorker", "prefill": "PrefillWorker"}
# exported only once their event happens, which this run does not provoke
EVENT_ONLY_METRICS = {"ray_mixquant_prefill_fallbacks_total": "recorded only when a remote prefill falls back"}
REPORT_WAIT_S = 30.0  # replicas report every second; generous for a loaded 2-core machine
SCRAPE_WAIT_S = 60.0  # Ray's metrics agent exports every few seconds


@pytest.fixture(scope="module")
def load_run(default_app):
    config = LoadConfig(
        base_url=default_app,
        concurrency=2,
        turns=3,
        think_time_s=0.1,
        tool_result_tokens=150,  # > local_prefill_tokens (64): every turn prefills on the prefill pool
        max_tokens=8,
        duration_s=None,
        max_requests=6,
        request_timeout_s=300,
    )
    since = time.time()
    run = asyncio.run(run_load(config))
    return run, since


def dashboard_metrics(base: str, since: float, expected_requests: int) -> dict:
    """The API's view from `since`, once every request has been reported (or the wait ran out)."""
    deadline = time.monotonic() + REPORT_WAIT_S
    while True:
        response = httpx.get(f"{base}/dashboard/api/metrics", params={"window_s": 1800, "since": since}, timeout=30)
        assert response.status_code == 200, response.text
        data = response.json()
        counted = {pool: sum(r["requests"] for r in data["replicas"] if r["pool"] == pool) for pool in ("router", "decode")}
        if min(counted.values()) >= expected_requests or time.monotonic() > deadline:
            return data
        time.sleep(1.0)


def test_api_shows_every_replica_and_agrees_with_the_load_generator(default_app, load_run, ray_serve):
    run, since = load_run
    assert all(r.ok for r in run.results), [r.error for r in run.results if not r.ok]
    ours = summarize(run)
    remote = sum(r.prefill == "remote" for r in run.results)
    assert ours["ok"] == 6 and remote >= 1

    data = dashboard_metrics(default_app, since, ours["ok"])
    summary = data["summary"]
    assert summary["requests"] == summary["ok"] == ours["ok"]
    assert summary["prefills"]["remote"] == remote and summary["kv_transfer_bytes"] > 0

    deployments = ray_serve.status().applications[APP_NAME].deployments
    for pool, deployment in POOL_DEPLOYMENTS.items():
        running = deployments[deployment].replica_states.get("RUNNING", 0)
        rows = [r for r in data["replicas"] if r["pool"] == pool and r["alive"]]
        assert len(rows) == running >= 1, (pool, rows)
        assert data["pools"][pool] == running
    served = {pool: sum(r["requests"] for r in data["replicas"] if r["pool"] == pool) for pool in POOL_DEPLOYMENTS}
    assert served == {"router": ours["ok"], "decode": ours["ok"], "prefill": remote}

    # The router times a sub-interval of what the client times (after the HTTP body and tokenization,
    # before the response leaves), request by request, so every percentile is at most the client's.
    for key in ("ttft_s", "e2e_s"):
        for q in ("p50", "p90", "p99"):
            assert 0 < summary[key][q] <= ours[key][q], (key, q, summary[key], ours[key])
    assert summary["itl_s"]["p50"] > 0 and data["series"]["replicas"]["prefill"][-1] >= 1
    print(f"\nload generator: TTFT {ours['ttft_s']}, ITL {ours['itl_s']}, E2E {ours['e2e_s']}")
    print(f"dashboard:      TTFT {summary['ttft_s']}, ITL {summary['itl_s']}, E2E {summary['e2e_s']}")


def test_tool_results_have_about_the_requested_length(bundled):
    """`--tool-result-tokens` in the model's own tokens (the bundled tokenizer; the app loads it anyway)."""
    import random

    from mixquant_serve.loadgen.sessions import tool_result

    for tokens in (100, 400, 1600):
        measured = len(bundled.tokenizer.encode(tool_result(random.Random(0), tokens)))
        assert 0.75 * tokens <= measured <= 1.25 * tokens, (tokens, measured)


def test_bad_window_is_a_400_naming_the_parameter(default_app):
    response = httpx.get(f"{default_app}/dashboard/api/metrics", params={"window_s": "-3"}, timeout=30)
    assert response.status_code == 400 and "window_s" in response.json()["error"]["message"]
    response = httpx.get(f"{default_app}/dashboard/api/metrics", params={"since": "yesterday"}, timeout=30)
    assert response.status_code == 400 and "since" in response.json()["error"]["message"]


def scrape_ray_metrics() -> str:
    import ray

    texts = []
    for node in ray.nodes():
        if node["Alive"] and node.get("MetricsExportPort"):
            url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            texts.append(httpx.get(url, timeout=30).text)
    return "\n".join(texts)


def test_grafana_dashboard_names_are_in_a_live_scrape(load_run):
    used = set(re.findall(r"ray_mixquant_[a-z0-9_]+", GRAFANA.read_text()))
    defined = {name for spec in METRICS for name in exported_series_names(spec)}
    assert used <= defined
    deadline = time.monotonic() + SCRAPE_WAIT_S
    while True:
        scraped = set(re.findall(r"^(ray_mixquant_[a-z0-9_]+)\{", scrape_ray_metrics(), flags=re.MULTILINE))
        missing = used - scraped
        if missing <= set(EVENT_ONLY_METRICS) or time.monotonic() > deadline:
            break
        time.sleep(2.0)
    assert missing <= set(EVENT_ONLY_METRICS), f"the Grafana dashboard uses names nobody exports: {sorted(missing)}"
    exported = {spec.name for spec in METRICS if set(exported_series_names(spec)) & scraped}
    assert {"mixquant_ttft_seconds", "mixquant_kv_transfer_bytes_total", "mixquant_pool_replicas",
            "mixquant_running_sequences", "mixquant_prefill_queued_tokens"} <= exported


def chromium_binary() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it: apt-get install chromium)")
    return binary


def render_in_chromium(url: str, out: Path) -> tuple[str, list[str]]:
    """The page's DOM after its first refreshes, and the browser's console lines (expected: none)."""
    browser = [
        chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
        "--no-first-run", "--window-size=1400,2300", "--virtual-time-budget=10000", f"--user-data-dir={out / 'profile'}",
    ]
    run = subprocess.run([*browser, "--enable-logging=stderr", "--v=0", "--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout, [line for line in run.stderr.splitlines() if "CONSOLE" in line]


def panel_states(dom: str) -> dict[str, str]:
    return dict(re.findall(r'<section class="panel[^"]*" id="panel-([a-z0-9]+)" data-state="([a-z]+)"', dom))


def test_empty_page_says_what_is_missing(tmp_path):
    """No app needed: the page and an empty collector behind the same two routes, served by http.server."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    from mixquant_serve.dashboard.collector import MetricsCollector
    from mixquant_serve.dashboard.routes import PAGE_PATH

    collector = MetricsCollector()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            api = self.path.startswith("/dashboard/api/metrics")
            body = json.dumps(collector.snapshot(300)).encode() if api else PAGE_PATH.read_bytes()
            self.send_response(200)
            self.send_header("content-type", "application/json" if api else "text/html; charset=utf-8")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dom, console = render_in_chromium(f"http://127.0.0.1:{server.server_port}/dashboard", tmp_path)
    finally:
        server.shutdown()
    assert not console, console
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert 'data-errors="0"' in body and "data-fetch-error" not in body and 'data-refreshes="0"' not in body, body
    states = panel_states(dom)
    assert len(states) == 11 and set(states.values()) == {"empty"}, states
    messages = re.findall(r'<p class="empty">([^<]+)</p>', dom)
    assert len(messages) == 11 and any("No finished requests" in m for m in messages)
    assert any("No replica has reported" in m for m in messages) and "<svg" not in dom


def test_page_renders_charts_without_console_errors_in_headless_chromium(default_app, load_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("dashboard")
    url = f"{default_app}/dashboard"
    dom, console = render_in_chromium(url, out)
    assert not console, console
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert 'data-errors="0"' in body and "data-fetch-error" not in body, body
    assert int(re.search(r'data-refreshes="(\d+)"', body).group(1)) >= 1
    states = panel_states(dom)
    for panel in ("ttft", "itl", "e2e", "breakdown", "requests", "tokens", "replicas", "transfer", "cache", "location", "table"):
        assert states.get(panel) == "rendered", (panel, states)
    for panel in ("ttft", "itl", "replicas", "transfer"):
        section = re.search(rf'id="panel-{panel}".*?</section>', dom, flags=re.DOTALL).group(0)
        assert re.search(r'<path d="M[^"]+"[^>]*class="series"', section), f"{panel}: no drawn series"
    assert dom.count("<tr>") >= 1 + 3  # header + one row per replica (router, decode, prefill)

    shot = out / "dashboard.png"
    browser = [chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
               "--no-first-run", "--window-size=1400,2300", "--virtual-time-budget=10000", f"--user-data-dir={out / 'profile'}"]
    shot_run = subprocess.run([*browser, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=180)
    assert shot_run.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", shot_run.stderr[-2000:]
    print(f"\ndashboard screenshot: {shot}")
    (out / "dashboard.html").write_text(dom)
    (out / "metrics.json").write_text(json.dumps(httpx.get(f"{default_app}/dashboard/api/metrics", timeout=30).json(), indent=1))
