"""Faults, limits and fuzzing on the real app: Serve, NVFP4 prefill pool, two precise decode replicas, real NIXL.

One app for the module ("faults" at /faults): 1 prefill replica, 2 decode replicas whose KV transports
carry a fault injector (decode.transfer_fault_injection), API keys from a file, small limits so that
fuzzed valid requests stay cheap. The tests run in file order and share the app; the two that kill a
replica come last. Each fault is injected for real (ray.kill of a replica actor, a failure or delay
inside NixlTransport.read_blocks / send_notification) and each test fails if its handling is removed:

- pull failure / timeout -> local fallback, counted, output equal to the all-precise reference; the
  prefill replica unpins by the decode side's notification, or by the lease when that cannot arrive.
- client disconnect and cancellation (during the remote prefill, or mid-stream) -> blocks free on
  both pools without waiting for the lease.
- prefill replica killed with requests in flight -> all complete by local fallback; the restarted
  replica is used again after a fresh NIXL handshake.
- decode replica killed mid-stream -> SSE error event and a closed stream, 503 for a non-streaming
  call; the session's next turn is served by the other replica.

Takes ~3-5 min on 2 shared cores (app start ~1-2 min, prefill restart ~1 min).
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from benchmarks.fuzz_router import run_fuzz
from mixquant_serve.engine.build import build_local_pipeline
from mixquant_serve.engine.config import EngineConfig
from mixquant_serve.engine.sampling import SamplingParams
from mixquant_serve.protocol import SessionRoute
from mixquant_serve.transfer.faults import FaultPlan
from tests.app_config import BUNDLED, DEFAULT_ENGINE, DEFAULT_LOCAL_PREFILL_TOKENS, SERVE_BASE

pytestmark = pytest.mark.slow

APP = "faults"
PREFIX = "/faults"
BASE = f"{SERVE_BASE}{PREFIX}"
MODEL = "smollm2-135m-instruct"
API_KEY = "sk-mixquant-faults-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
LEASE_S = 10.0  # prefill pin lease: long against a pull, short enough to wait for once
KV_TIMEOUT_S = 3.0
MAX_TOKENS_CAP = 32
MAX_PROMPT_TOKENS = 2500
MAX_BODY_BYTES = 256 * 1024
NUM_DECODE = 2
FUZZ_CASES_CI = 100  # the full run (500) is `python -m benchmarks.fuzz_router`, see docs/decisions.md
GREEDY_TOKENS = 8
WAIT_S = 120.0


@pytest.fixture(scope="module")
def app(ray_serve, model_cache_dir, bundled, tmp_path_factory):
    from mixquant_serve.app import build_app
    from mixquant_serve.config import AppConfig

    keys = tmp_path_factory.mktemp("faults-keys") / "api_keys.txt"
    keys.write_text(f"# test key\n{API_KEY}\n")
    config = AppConfig.model_validate({
        "model": BUNDLED,
        "device": "cpu",
        "model_cache_dir": str(model_cache_dir),
        "prefill": {
            "precision": "nvfp4",
            "resources": {"num_cpus": 0.25},
            "autoscaling": {"min_replicas": 1, "max_replicas": 1},
            "engine": {**DEFAULT_ENGINE, "max_num_seqs": 4, "kv_lease_seconds": LEASE_S},
        },
        "decode": {
            "local_prefill_tokens": DEFAULT_LOCAL_PREFILL_TOKENS,
            "kv_transfer_timeout_s": KV_TIMEOUT_S,
            "prefill_timeout_s": 60.0,
            "transfer_fault_injection": True,
            "resources": {"num_cpus": 0.25},
            "autoscaling": {"min_replicas": NUM_DECODE, "max_replicas": NUM_DECODE},
            "engine": DEFAULT_ENGINE,
        },
        "router": {
            "num_cpus": 0.05,
            "max_tokens_cap": MAX_TOKENS_CAP,
            "max_prompt_tokens": MAX_PROMPT_TOKENS,
            "max_body_bytes": MAX_BODY_BYTES,
            "api_keys": {"keys_file": str(keys)},
        },
    })
    ray_serve.run(build_app(config), name=APP, route_prefix=PREFIX)
    yield BASE
    ray_serve.delete(APP)


# ---------------------------------------------------------------------------------------------- helpers


def records_prompt(seed: int, records: int = 40) -> str:
    lines = [f"Record {i}: station {(i * seed) % 9} measured {(i * 37 + seed) % 113} units." for i in range(records)]
    return " ".join(lines) + f"\nQuestion {seed}: which station measured the most units? Answer:"


def complete(prompt: str, session: str, max_tokens: int = GREEDY_TOKENS, timeout: float = 300) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(f"{BASE}/v1/completions", json=body, headers={**AUTH, "x-session-id": session}, timeout=timeout)


def reference_text(bundled, prompt: str, remote: bool) -> str:
    """The one-process pipeline's greedy text: NVFP4 prefill + precise decode, or all precise (the fallback)."""
    local_tokens = DEFAULT_LOCAL_PREFILL_TOKENS if remote else 10**9
    pipeline, _ = build_local_pipeline(BUNDLED, "nvfp4", torch.device("cpu"), EngineConfig(**DEFAULT_ENGINE), local_tokens, loaded=bundled)
    generation = pipeline.generate(bundled.tokenizer.encode(prompt), SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0))
    assert generation.report.prefill == ("remote" if remote else "local")
    return generation.text


@functools.lru_cache(maxsize=None)
def handle(deployment: str):
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name=APP)


def replica_stats(deployment: str, count: int) -> dict[str, dict]:
    """`replica_stats()` of every replica of a pool, by replica id (calls without a session spread at random)."""
    seen: dict[str, dict] = {}
    pool = handle(deployment)
    for _ in range(200):
        stats = pool.replica_stats.remote().result(timeout_s=60)
        seen[stats["replica"]] = stats
        if len(seen) == count:
            return seen
    pytest.fail(f"only {len(seen)} of {count} {deployment} replicas answered")


def prefill_stats() -> dict:
    return next(iter(replica_stats("PrefillWorker", 1).values()))


def decode_totals(key: str) -> float:
    return sum(stats[key] for stats in replica_stats("DecodeWorker", NUM_DECODE).values())


def wait_no_blocks_in_use(timeout_s: float = 60.0) -> tuple[dict, dict[str, dict]]:
    """Polls until no KV block is used or pinned on any replica of either pool; returns the last stats."""
    deadline = time.monotonic() + timeout_s
    while True:
        prefill = prefill_stats()
        decode = replica_stats("DecodeWorker", NUM_DECODE)
        busy = [r for r, s in decode.items() if s["kv_block_usage"] or s["running_seqs"] or s["waiting_seqs"]]
        if not busy and prefill["kv_block_usage"] == 0 and prefill["pinned_requests"] == 0 and prefill["pending_requests"] == 0:
            return prefill, decode
        if time.monotonic() > deadline:
            pytest.fail(f"KV blocks still in use: prefill {json.dumps(prefill)}, decode {json.dumps(decode)}")
        time.sleep(0.25)


def arm(session: str, plan: FaultPlan) -> str:
    """Arms `plan` in the transport of the decode replica that serves `session`; returns that replica's id."""
    return handle("DecodeWorker").arm_transfer_fault.remote(SessionRoute(session), plan).result(timeout_s=60)


def replica_actor(deployment: str, replica_id: str | None = None):
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    if replica_id is not None:
        names = [name for name in names if name.endswith(f"#{replica_id}")]
    assert len(names) == 1, names
    return names[0], ray.get_actor(names[0], namespace="serve")


# ---------------------------------------------------------------------------------------------- limits and keys


def test_api_keys_and_limits_on_the_real_app(app):
    assert httpx.get(f"{BASE}/health", timeout=30).status_code == 200  # open without a key
    denied = httpx.get(f"{BASE}/v1/models", timeout=30)
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    wrong = httpx.post(f"{BASE}/v1/completions", json={"model": MODEL, "prompt": "hi"}, headers={"Authorization": "Bearer sk-wrong"}, timeout=30)
    assert wrong.status_code == 401
    assert httpx.get(f"{BASE}/v1/models", headers=AUTH, timeout=30).status_code == 200

    over_cap = httpx.post(f"{BASE}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": MAX_TOKENS_CAP + 1}, headers=AUTH, timeout=30)
    assert over_cap.status_code == 400 and over_cap.json()["error"]["param"] == "max_tokens"
    too_long = httpx.post(f"{BASE}/v1/completions", json={"model": MODEL, "prompt": "word " * (MAX_PROMPT_TOKENS + 10)}, headers=AUTH, timeout=60)
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "prompt_too_long"
    oversized = httpx.post(f"{BASE}/v1/completions", content=b'{"prompt": "' + b"x" * MAX_BODY_BYTES + b'"}', headers={**AUTH, "content-type": "application/json"}, timeout=60)
    assert oversized.status_code == 413 and oversized.json()["error"]["code"] == "request_too_large"
    wait_no_blocks_in_use()


# ---------------------------------------------------------------------------------------------- KV pull faults


@pytest.mark.parametrize(
    "plan, reason",
    [
        (FaultPlan("before_read", "fail"), "injected failure at before_read"),
        (FaultPlan("after_post", "delay", delay_s=KV_TIMEOUT_S + 2.0), f"exceeded {KV_TIMEOUT_S} s"),
    ],
    ids=["failure", "timeout"],
)
def test_kv_pull_fault_falls_back_to_precise_local_prefill(app, bundled, plan, reason):
    session = f"pull-{plan.point}"
    prompt = records_prompt(seed=3 if plan.action == "fail" else 5)
    before = prefill_stats()
    fallbacks_before = decode_totals("fallbacks")
    replica = arm(session, plan)

    response = complete(prompt, session)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["mixquant"]["decode_replica"] == replica  # the armed replica served it
    assert body["mixquant"]["prefill"] == "local" and reason in body["mixquant"]["fallback_reason"]
    assert body["choices"][0]["text"] == reference_text(bundled, prompt, remote=False)  # all precise, nothing lost
    assert decode_totals("fallbacks") == fallbacks_before + 1

    after, _ = wait_no_blocks_in_use()
    assert after["released_by_notification"] >= before["released_by_notification"] + 1  # told at once, not leased
    assert after["released_by_lease"] == before["released_by_lease"]


def test_lease_frees_pinned_blocks_when_the_release_cannot_be_sent(app):
    session = "pull-and-notify-fail"
    replica = arm(session, FaultPlan("before_read", "fail"))
    assert arm(session, FaultPlan("before_notify", "fail")) == replica
    before = prefill_stats()

    response = complete(records_prompt(seed=7), session)
    assert response.status_code == 200, response.text
    assert "kv transfer failed" in response.json()["mixquant"]["fallback_reason"]

    after, _ = wait_no_blocks_in_use(timeout_s=LEASE_S * 3 + 30)
    assert after["released_by_lease"] == before["released_by_lease"] + 1
    assert after["released_by_notification"] == before["released_by_notification"]


# ---------------------------------------------------------------------------------------------- disconnects


def test_cancelling_during_the_remote_prefill_frees_both_pools_without_the_lease(app):
    before = prefill_stats()
    aborted_before = decode_totals("aborted")
    prompt = records_prompt(seed=11, records=120)  # ~1,800 tokens: the NVFP4 prefill takes seconds here

    async def cancel_while_prefilling() -> bool:
        prefill = handle("PrefillWorker")
        async with httpx.AsyncClient(timeout=300) as client:
            body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS_CAP, "temperature": 0}
            request = asyncio.ensure_future(client.post(f"{BASE}/v1/completions", json=body, headers={**AUTH, "x-session-id": "cancel-prefill"}))
            seen_prefilling = False
            while not request.done():
                stats = await prefill.replica_stats.remote()
                if stats["pending_requests"] >= 1:
                    seen_prefilling = True
                    break
                await asyncio.sleep(0.05)
            request.cancel()  # the client goes away: httpx closes the connection
            await asyncio.gather(request, return_exceptions=True)
            return seen_prefilling

    assert asyncio.run(cancel_while_prefilling()), "the request finished before its prefill was seen running"
    after, _ = wait_no_blocks_in_use()
    assert after["released_by_lease"] == before["released_by_lease"]  # freed by the cancellation, not by expiry
    assert decode_totals("aborted") == aborted_before + 1


def test_client_disconnect_mid_stream_frees_both_pools_without_the_lease(app):
    before = prefill_stats()
    aborted_before = decode_totals("aborted")
    body = {"model": MODEL, "prompt": records_prompt(seed=13), "max_tokens": MAX_TOKENS_CAP, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{BASE}/v1/completions", json=body, headers={**AUTH, "x-session-id": "disconnect"}, timeout=300) as raw:
        assert raw.status_code == 200
        for line in raw.iter_lines():
            if line.startswith("data: {") and '"text":""' not in line:
                break  # a real token arrived: hang up
    after, _ = wait_no_blocks_in_use()
    assert after["released_by_lease"] == before["released_by_lease"]
    assert decode_totals("aborted") == aborted_before + 1


# ---------------------------------------------------------------------------------------------- fuzzing


def test_fuzzed_requests_get_no_5xx_and_no_hang(app):
    report = run_fuzz(BASE, FUZZ_CASES_CI, headers=AUTH, seed=7)
    print("fuzz:", json.dumps(report.summary()))
    assert report.num_requests >= FUZZ_CASES_CI
    assert report.num_server_errors == 0 and report.num_hangs == 0, report.failures
    assert report.statuses[200] > 0 and report.statuses[400] > 0  # both valid and invalid bodies went through
    wait_no_blocks_in_use()


# ---------------------------------------------------------------------------------------------- replica deaths


def test_prefill_replica_killed_with_requests_in_flight(app, bundled):
    import ray
    from ray import serve

    prompts = [records_prompt(seed=20 + i) for i in range(6)]
    killed_name, killed = replica_actor("PrefillWorker")
    handshakes_before_kill = decode_totals("peer_handshakes")
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(complete, prompt, f"prefill-kill-{i}") for i, prompt in enumerate(prompts)]
        deadline = time.monotonic() + WAIT_S
        while prefill_stats()["pending_requests"] < 1:  # a prefill is running or queued: kill the replica now
            assert time.monotonic() < deadline and not all(f.done() for f in futures)
            time.sleep(0.05)
        ray.kill(killed, no_restart=True)
        responses = [future.result() for future in futures]

    fallbacks = 0
    for prompt, response in zip(prompts, responses):
        assert response.status_code == 200, response.text
        stats = response.json()["mixquant"]
        remote = stats["prefill"] == "remote"
        fallbacks += not remote
        if not remote:
            assert stats["fallback_reason"].startswith(("prefill failed", "kv transfer failed"))
        assert response.json()["choices"][0]["text"] == reference_text(bundled, prompt, remote)
    assert fallbacks >= 1

    # Serve replaces the replica; its NIXL agent is new, and decode replicas must handshake with it again
    deadline = time.monotonic() + WAIT_S * 2
    while True:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(f"SERVE_REPLICA::{APP}#PrefillWorker#")]
        status = serve.status().applications[APP].deployments["PrefillWorker"]
        if names and killed_name not in names and status.status == "HEALTHY":
            break
        assert time.monotonic() < deadline, f"the prefill replica did not come back: {status}"
        time.sleep(1.0)
    session = "after-prefill-restart"
    for attempt in range(3):  # handles learn of the new replica within a few seconds
        response = complete(records_prompt(seed=40 + attempt), session)
        assert response.status_code == 200, response.text
        if response.json()["mixquant"]["prefill"] == "remote":
            break
        time.sleep(5.0)
    stats = response.json()["mixquant"]
    assert stats["prefill"] == "remote" and stats["kv_transfer_bytes"] > 0, stats
    # the new agent was reached through a new handshake (perhaps already by a request queued during the restart)
    assert decode_totals("peer_handshakes") >= handshakes_before_kill + 1
    wait_no_blocks_in_use()


def test_decode_replica_killed_mid_stream(app):
    import ray

    session = "decode-kill"
    counting = "Count from 1 to 200: 1, 2, 3, 4, 5, 6, 7, 8,"
    first = complete("Say hello.", session, max_tokens=2)
    assert first.status_code == 200, first.text
    home = first.json()["mixquant"]["decode_replica"]
    _, home_actor = replica_actor("DecodeWorker", home)

    body = {"model": MODEL, "prompt": counting, "max_tokens": MAX_TOKENS_CAP, "temperature": 0}
    with ThreadPoolExecutor(1) as pool:
        non_streaming = pool.submit(complete, counting, session, MAX_TOKENS_CAP)
        lines: list[str] = []
        with httpx.stream("POST", f"{BASE}/v1/completions", json={**body, "stream": True}, headers={**AUTH, "x-session-id": session}, timeout=300) as raw:
            assert raw.status_code == 200
            killed = False
            for line in raw.iter_lines():  # ends when the server closes the stream
                if line:
                    lines.append(line)
                if not killed and line.startswith("data: {") and '"text":""' not in line:
                    ray.kill(home_actor, no_restart=True)
                    killed = True
        failed = non_streaming.result()

    assert killed and lines[-1] != "data: [DONE]"
    error = json.loads(lines[-1][len("data: "):])["error"]
    assert error["type"] == "server_error" and error["code"] == "generation_failed" and error["message"]
    assert not any('"finish_reason":"length"' in line or '"finish_reason":"stop"' in line for line in lines)
    assert failed.status_code == 503, failed.text
    assert failed.json()["error"]["message"].startswith("generation failed")

    following = complete("Say hello again.", session, max_tokens=2)
    assert following.status_code == 200, following.text
    stats = following.json()["mixquant"]
    assert stats["decode_replica"] != home and stats["cached_tokens_decode"] == 0  # another replica, cache miss
