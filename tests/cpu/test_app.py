"""The real application on CPU: `build_app` on a local Ray cluster, driven over HTTP with the openai client.

One app for the module (starting Serve and two model replicas costs ~30-60 s here): the bundled
SmolLM2-135M-Instruct, NVFP4 prefill pool, precise decode pool, real NIXL between them.
Autoscaling under load is not exercised here (see tests/cpu/test_autoscaling.py for the policies on
a real Serve cluster driven by custom metrics).
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
import torch

from mixquant_serve.engine.build import build_local_pipeline
from mixquant_serve.engine.config import EngineConfig
from mixquant_serve.engine.sampling import SamplingParams
from tests.app_config import DEFAULT_ENGINE, DEFAULT_LOCAL_PREFILL_TOKENS, SERVE_BASE

pytestmark = pytest.mark.slow
BASE = SERVE_BASE
MODEL = "smollm2-135m-instruct"
BLOCK = DEFAULT_ENGINE["block_size"]
LOCAL_PREFILL_TOKENS = DEFAULT_LOCAL_PREFILL_TOKENS
ENGINE = DEFAULT_ENGINE


@pytest.fixture(scope="module")
def app(default_app):
    return default_app


@pytest.fixture(scope="module")
def client(app):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=600)


def chat_ids(bundled, messages):
    return bundled.tokenizer.apply_chat_template(messages)


def stats() -> dict:
    return httpx.get(f"{BASE}/stats", timeout=30).json()


def wait_all_blocks_free(timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        current = stats()
        used = current["decode"]["kv_block_usage"] + current["prefill"]["kv_block_usage"]
        if used == 0 and current["prefill"]["pinned_requests"] == 0:
            return current
        if time.monotonic() > deadline:
            pytest.fail(f"KV blocks still in use: {json.dumps(current)}")
        time.sleep(0.5)


LONG_CONTEXT = " ".join(f"Record {i}: station {i % 9} measured {i * 37 % 113} units." for i in range(40))


def test_greedy_http_equals_the_one_process_pipeline(client, bundled):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": LONG_CONTEXT + "\nWhat did record 4 measure?"}]
    pipeline, _ = build_local_pipeline("bundled:smollm2-135m-instruct", "nvfp4", torch.device("cpu"), EngineConfig(**ENGINE), LOCAL_PREFILL_TOKENS, loaded=bundled)
    expected = pipeline.generate(chat_ids(bundled, messages), SamplingParams(max_tokens=16, temperature=0.0))
    assert expected.report.prefill == "remote"

    response = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    body = response.http_response.json()
    assert body["choices"][0]["message"]["content"] == expected.text
    assert body["mixquant"]["prefill"] == "remote" and body["mixquant"]["prefill_precision"] == "nvfp4"
    assert body["mixquant"]["kv_transfer_bytes"] > 0 and body["mixquant"]["fallback_reason"] is None  # NIXL, no fallback

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == expected.text
    with httpx.stream("POST", f"{BASE}/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0, "stream": True}, timeout=300) as raw:
        lines = [line for line in raw.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    wait_all_blocks_free()


def test_two_turn_session_transfers_only_new_blocks_then_a_short_turn_stays_local(client, bundled):
    headers = {"x-session-id": "agent-two-turns"}
    system = {"role": "system", "content": "You are a data agent. Answer briefly."}
    turn1 = [system, {"role": "user", "content": LONG_CONTEXT + "\nWhich station measured 37 units?"}]
    first = client.chat.completions.with_raw_response.create(model=MODEL, messages=turn1, max_tokens=12, temperature=0, extra_headers=headers).http_response.json()
    assert first["mixquant"]["prefill"] == "remote"
    reply = first["choices"][0]["message"]["content"]
    tool_result = json.dumps([{"id": i, "name": f"sensor-{i}", "value": i * 7 % 41} for i in range(45)])
    turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Tool result: " + tool_result}]
    ids2 = chat_ids(bundled, turn2)
    assert len(ids2) - len(chat_ids(bundled, turn1)) >= 300
    second = client.chat.completions.with_raw_response.create(model=MODEL, messages=turn2, max_tokens=8, temperature=0, extra_headers=headers).http_response.json()
    stats2 = second["mixquant"]
    assert stats2["prefill"] == "remote" and stats2["cached_tokens_decode"] > 0
    # exactly the blocks of prompt[:-1] after the decode replica's cached prefix travel
    new_blocks = -(-(len(ids2) - 1) // BLOCK) - stats2["cached_tokens_decode"] // BLOCK
    block_bytes = 30 * 2 * BLOCK * 3 * 64 * 4  # layers x (k, v) x block x kv heads x head dim x fp32
    assert stats2["kv_transfer_bytes"] == new_blocks * block_bytes
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0

    turn3 = turn2 + [{"role": "assistant", "content": second["choices"][0]["message"]["content"]}, {"role": "user", "content": "Thanks. And sensor-3?"}]
    third = client.chat.completions.with_raw_response.create(model=MODEL, messages=turn3, max_tokens=8, temperature=0, extra_headers=headers).http_response.json()
    assert third["mixquant"]["prefill"] == "local" and third["mixquant"]["kv_transfer_bytes"] == 0
    wait_all_blocks_free()


@pytest.mark.parametrize(
    "body, status, field",
    [
        ("{not json", 400, "body"),
        ({"model": MODEL}, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 9000}]}, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
        ({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field_and_leaks_nothing(app, body, status, field):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(f"{BASE}/v1/chat/completions", content=content, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert field in (error.get("param") or "") + error["message"]
    wait_all_blocks_free()


def test_client_disconnect_mid_stream_frees_blocks_on_both_pools(app):
    body = {"model": MODEL, "messages": [{"role": "user", "content": LONG_CONTEXT + "\nTell me a long story."}], "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{BASE}/v1/chat/completions", json=body, timeout=300) as raw:
        for line in raw.iter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                break  # a real token arrived: hang up
    wait_all_blocks_free()
