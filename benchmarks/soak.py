"""Soak: many multi-turn agent sessions against a running app; no 5xx, no leaked KV blocks, flat memory.

    python -m benchmarks.soak --start                      # starts Ray + Serve + the CPU default app here
    python -m benchmarks.soak --base-url http://127.0.0.1:8000 --app-name mixquant   # an app already running
                                                           # in the Ray cluster this process joins (address auto)

Each session is an agent loop: a first turn with a context of a few hundred tokens (some prefilled
remotely, some locally), then turns that append the model's reply and a tool result, all under one
x-session-id; half the requests stream. Sessions run `--concurrency` at a time. At the end the
driver waits for every replica of both pools to report zero KV blocks in use and nothing pinned
(`replica_stats()` over Serve handles, every replica), and reads the resident memory of every
replica process of the app (Ray state API + /proc, same host) after the warm-up and at the end.

Reported (JSON): requests by status, remote/local/fallback prefills, latency and TTFT p50/p99,
leaked blocks per replica, memory per replica (warm-up, peak, end). Exit status 1 on any 5xx,
transport error, or leaked block. tests/cpu/test_soak.py runs a short version in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REQUEST_TIMEOUT_S = 300.0
LEAK_WAIT_S = 60.0  # pinned prefill blocks are released by notification at once, by lease at the latest
MEMORY_SAMPLE_S = 2.0
WARMUP_FRACTION = 0.1  # memory after this fraction of the sessions is the baseline
POOLS = ("PrefillWorker", "DecodeWorker")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
TOOL_NAMES = ("search_logs", "read_file", "query_metrics", "list_jobs")


@dataclass
class SoakSettings:
    sessions: int = 200
    concurrency: int = 16
    turns: int = 3
    max_tokens: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("sessions", "concurrency", "turns", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class RequestRecord:
    status: int | str  # HTTP status, or "timeout" / "transport" / "stream_error"
    seconds: float
    ttft_s: float | None  # streams only
    prefill: str | None  # remote | local
    fallback: bool


@dataclass
class SoakReport:
    records: list[RequestRecord] = field(default_factory=list)
    leaked_blocks: dict[str, dict[str, float]] = field(default_factory=dict)  # replica -> what it still holds
    memory_mib: dict[str, dict[str, float]] = field(default_factory=dict)  # replica -> warm, peak, end
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def num_server_errors(self) -> int:
        return sum(1 for r in self.records if not isinstance(r.status, int) or r.status >= 500)

    @property
    def num_leaked(self) -> int:
        return len(self.leaked_blocks)

    def summary(self) -> dict[str, Any]:
        latencies = [r.seconds for r in self.records if r.status == 200]
        ttfts = [r.ttft_s for r in self.records if r.status == 200 and r.ttft_s is not None]
        return {
            "requests": len(self.records),
            "statuses": dict(collections.Counter(str(r.status) for r in self.records)),
            "prefill": dict(collections.Counter(r.prefill for r in self.records if r.prefill)),
            "fallbacks": sum(r.fallback for r in self.records),
            "server_errors": self.num_server_errors,
            "latency_s": percentiles(latencies),
            "ttft_s": percentiles(ttfts),
            "leaked_blocks": self.leaked_blocks,
            "memory_mib": self.memory_mib,
            "seconds": round(self.seconds, 1),
            "errors": self.errors[:20],
        }


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)
    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": round(ordered[-1], 3), "mean": round(statistics.fmean(ordered), 3)}


# ---------------------------------------------------------------------------------------------- sessions


def first_turn(rng: random.Random, session: int) -> list[dict[str, str]]:
    records = rng.randint(5, 45)  # ~15 tokens a record: 75-700 tokens, both sides of local_prefill_tokens
    context = " ".join(f"Job {session}-{i}: status {rng.choice(('ok', 'failed', 'queued'))}, took {rng.randint(1, 999)} s." for i in range(records))
    return [
        {"role": "system", "content": "You are an operations agent. Answer in one short sentence."},
        {"role": "user", "content": f"{context}\nWhich job took longest?"},
    ]


def tool_result(rng: random.Random) -> str:
    rows = [{"id": rng.randint(0, 9999), "value": rng.randint(0, 500)} for _ in range(rng.randint(1, 20))]
    return f"Tool {rng.choice(TOOL_NAMES)} returned: {json.dumps(rows)}"


async def run_session(client, base_url: str, headers: dict[str, str], model: str, settings: SoakSettings,
                      index: int, report: SoakReport) -> None:
    rng = random.Random(settings.seed * 1_000_003 + index)
    messages = first_turn(rng, index)
    session_headers = {**headers, "x-session-id": f"soak-{settings.seed}-{index}"}
    for _ in range(settings.turns):
        body = {"model": model, "messages": messages, "max_tokens": settings.max_tokens, "temperature": 0.7, "seed": index}
        stream = rng.random() < 0.5
        record, reply = await (stream_once if stream else call_once)(client, f"{base_url}/v1/chat/completions", body, session_headers)
        report.records.append(record)
        if record.status != 200:
            report.errors.append(f"session {index}: {record.status}")
            return
        messages = messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": tool_result(rng)}]


async def call_once(client, url: str, body: dict, headers: dict[str, str]) -> tuple[RequestRecord, str]:
    import httpx

    started = time.perf_counter()
    try:
        response = await client.post(url, json=body, headers=headers, timeout=REQUEST_TIMEOUT_S)
    except httpx.TimeoutException:
        return RequestRecord("timeout", time.perf_counter() - started, None, None, False), ""
    except httpx.TransportError as error:
        return RequestRecord(f"transport:{type(error).__name__}", time.perf_counter() - started, None, None, False), ""
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        return RequestRecord(response.status_code, seconds, None, None, False), ""
    payload = response.json()
    stats = payload.get("mixquant") or {}
    reply = payload["choices"][0]["message"]["content"] or ""
    return RequestRecord(200, seconds, None, stats.get("prefill"), bool(stats.get("fallback_reason"))), reply


async def stream_once(client, url: str, body: dict, headers: dict[str, str]) -> tuple[RequestRecord, str]:
    import httpx

    started, ttft, parts, stats, done = time.perf_counter(), None, [], {}, False
    try:
        async with client.stream("POST", url, json={**body, "stream": True}, headers=headers, timeout=REQUEST_TIMEOUT_S) as response:
            if response.status_code != 200:
                await response.aread()
                return RequestRecord(response.status_code, time.perf_counter() - started, None, None, False), ""
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    return RequestRecord("stream_error", time.perf_counter() - started, None, None, False), ""
                for choice in event.get("choices", []):
                    text = choice.get("delta", {}).get("content")
                    if text:
                        ttft = ttft if ttft is not None else time.perf_counter() - started
                        parts.append(text)
                stats = event.get("mixquant") or stats
    except httpx.TimeoutException:
        return RequestRecord("timeout", time.perf_counter() - started, None, None, False), ""
    except httpx.TransportError as error:
        return RequestRecord(f"transport:{type(error).__name__}", time.perf_counter() - started, None, None, False), ""
    if not done:
        return RequestRecord("stream_error", time.perf_counter() - started, None, None, False), ""
    record = RequestRecord(200, time.perf_counter() - started, ttft, stats.get("prefill"), bool(stats.get("fallback_reason")))
    return record, "".join(parts)


# ---------------------------------------------------------------------------------------------- replicas


def replica_stats(app_name: str, deployment: str, count: int, attempts: int = 200) -> dict[str, dict]:
    """`replica_stats()` of every replica of a pool (calls without a session reach replicas at random)."""
    from ray import serve

    pool = serve.get_deployment_handle(deployment, app_name=app_name)
    seen: dict[str, dict] = {}
    for _ in range(attempts):
        stats = pool.replica_stats.remote().result(timeout_s=60)
        seen[stats["replica"]] = stats
        if len(seen) == count:
            return seen
    raise RuntimeError(f"only {len(seen)} of {count} {deployment} replicas answered")


def running_replicas(app_name: str, deployment: str) -> int:
    from ray import serve

    return serve.status().applications[app_name].deployments[deployment].replica_states.get("RUNNING", 0)


def leaked_blocks(app_name: str, wait_s: float = LEAK_WAIT_S) -> dict[str, dict[str, float]]:
    """Replicas still holding KV blocks (or pins, or sequences) after `wait_s`; {} when none."""
    deadline = time.monotonic() + wait_s
    while True:
        holding = {}
        for deployment in POOLS:
            for replica, stats in replica_stats(app_name, deployment, running_replicas(app_name, deployment)).items():
                held = {key: stats[key] for key in ("kv_block_usage", "pinned_requests", "pending_requests", "running_seqs", "waiting_seqs")
                        if stats.get(key)}
                if held:
                    holding[f"{deployment}/{replica}"] = held
        if not holding or time.monotonic() > deadline:
            return holding
        time.sleep(0.5)


def replica_memory_mib(app_name: str) -> dict[str, float]:
    """Resident memory of every live replica process of the app (Router and both pools), by actor name.

    The pids come from the GCS actor table (`ray._private.state.actors`, what `ray.state.actors` was): the
    public `ray.util.state` API needs Ray's dashboard, which test clusters do not start. Ray is pinned to 2.60.
    """
    from ray._private import state

    prefix = f"SERVE_REPLICA::{app_name}#"
    memory = {}
    for actor in state.actors(actor_state_name="ALIVE").values():
        name = actor["Name"] or ""
        statm = Path(f"/proc/{actor['Pid']}/statm")
        if name.startswith(prefix) and actor["Pid"] and statm.exists():
            resident_pages = int(statm.read_text().split()[1])
            memory[name[len(prefix):]] = resident_pages * PAGE_BYTES / 2**20
    return memory


# ---------------------------------------------------------------------------------------------- driver


async def run_sessions(base_url: str, headers: dict[str, str], settings: SoakSettings, report: SoakReport,
                       on_warm: Any = None) -> None:
    import httpx
    from tqdm import tqdm

    limits = httpx.Limits(max_connections=settings.concurrency * 2, max_keepalive_connections=settings.concurrency)
    async with httpx.AsyncClient(limits=limits) as client:
        model = (await client.get(f"{base_url}/v1/models", headers=headers, timeout=60)).json()["data"][0]["id"]
        gate = asyncio.Semaphore(settings.concurrency)
        warm_after = max(1, int(settings.sessions * WARMUP_FRACTION))
        finished = 0
        progress = tqdm(total=settings.sessions, unit="session", desc="soak", dynamic_ncols=True)

        async def one(index: int) -> None:
            nonlocal finished
            async with gate:
                await run_session(client, base_url, headers, model, settings, index, report)
            finished += 1
            progress.update(1)
            progress.set_postfix_str(f"{len(report.records)} requests")
            if finished == warm_after and on_warm is not None:
                on_warm()

        try:
            await asyncio.gather(*(one(i) for i in range(settings.sessions)))
        finally:
            progress.close()


def run_soak(base_url: str, app_name: str, settings: SoakSettings, headers: dict[str, str] | None = None) -> SoakReport:
    """Runs the sessions against `base_url`; needs a Ray connection to the cluster serving `app_name` (same host)."""
    import threading

    report = SoakReport()
    samples: dict[str, list[float]] = collections.defaultdict(list)
    warm: dict[str, float] = {}
    stop = threading.Event()

    def sample_memory() -> None:
        while not stop.wait(MEMORY_SAMPLE_S):
            for name, mib in replica_memory_mib(app_name).items():
                samples[name].append(mib)

    def record_warm() -> None:
        warm.update(replica_memory_mib(app_name))

    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        asyncio.run(run_sessions(base_url, headers or {}, settings, report, on_warm=record_warm))
    finally:
        stop.set()
        sampler.join()
    report.seconds = time.perf_counter() - started
    report.leaked_blocks = leaked_blocks(app_name)
    end = replica_memory_mib(app_name)
    for name, mib in end.items():
        peak = max(samples.get(name, []) + [mib])
        report.memory_mib[name] = {"warm": round(warm.get(name, float("nan")), 1), "peak": round(peak, 1), "end": round(mib, 1)}
    return report


DEFAULT_SERVE_CONFIG = Path(__file__).resolve().parents[1] / "serve_config.yaml"
START_NUM_CPUS = 4  # logical CPUs for the local Ray instance: the default app reserves ~1.7


def start_default_app(port: int) -> str:
    """Ray + Serve + the CPU default app (serve_config.yaml's args: 1 prefill + 1 decode replica) in this process."""
    import ray
    import yaml
    from ray import serve

    from mixquant_serve.app import build_app
    from mixquant_serve.config import AppConfig

    args = yaml.safe_load(DEFAULT_SERVE_CONFIG.read_text())["applications"][0]["args"]
    ray.init(num_cpus=START_NUM_CPUS, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(AppConfig.model_validate(args)), name="mixquant", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", action="store_true", help="Start Ray, Serve and the CPU default app here.")
    parser.add_argument("--port", type=int, default=8000, help="Serve's HTTP port with --start.")
    parser.add_argument("--base-url", default=None, help="The app's URL when it is already running.")
    parser.add_argument("--app-name", default="mixquant", help="The Serve application name (for replica stats).")
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default=None, help="Sent as 'Authorization: Bearer'.")
    parser.add_argument("--output", default=None, help="Also write the JSON report here.")
    args = parser.parse_args()
    if args.start:
        base_url = start_default_app(args.port)
    elif args.base_url:
        import ray

        ray.init(address="auto", log_to_driver=False)
        base_url = args.base_url
    else:
        parser.error("give --start or --base-url")
    settings = SoakSettings(args.sessions, args.concurrency, args.turns, args.max_tokens, args.seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    report = run_soak(base_url, args.app_name, settings, headers)
    text = json.dumps({"settings": vars(settings), **report.summary()}, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    raise SystemExit(1 if report.num_server_errors or report.num_leaked else 0)


if __name__ == "__main__":
    main()
