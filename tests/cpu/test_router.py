"""The OpenAI HTTP layer: routes, SSE, tool calls, errors, cancellation; a scripted worker, then the real engine."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from typing import Any, AsyncGenerator

import pytest
from fastapi.testclient import TestClient

from mixquant_serve.engine.sampling import SamplingParams
from mixquant_serve.protocol import GenerateChunk, GenerateRequest, RequestStats
from mixquant_serve.router import (
    OpenAIServer,
    ServerSettings,
    build_fastapi_app,
    decode_handle_generate,
)

MODEL = "test-model"
SETTINGS = ServerSettings(model_name=MODEL, max_model_len=200, max_tokens_cap=64, max_body_bytes=4096)
USER = [{"role": "user", "content": "hi"}]
STATS = RequestStats(
    "remote",
    "nvfp4",
    cached_tokens_prefill=16,
    cached_tokens_decode=8,
    kv_transfer_bytes=4096,
    kv_transfer_ms=1.5,
    queue_ms=0.5,
    prefill_ms=3.0,
    ttft_ms=5.0,
)
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CALL_TEXT = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


class CharTokenizer:
    """Stands in for `Tokenizer`: one token per character; the template writes "role: content" lines."""

    vocab_size = 256

    def __init__(self) -> None:
        self.templated: list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = []

    def encode(self, text: str) -> list[int]:
        return [ord(c) % self.vocab_size for c in text]

    def apply_chat_template(self, messages, tools=None, add_generation_prompt=True) -> list[int]:
        self.templated.append((messages, tools))
        return self.encode("".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: ")


class ScriptedDecode:
    """Stands in for the DecodeWorker: streams scripted text and records how each request's stream ended
    ("finished" once the final chunk is out; "closed" or "cancelled" if the server stopped reading before).

    script items: text deltas (the last one rides on the finished chunk), ("fail", message) for a failed
    chunk, ("raise", exception), ("hang",) to wait forever after the chunks so far.
    """

    def __init__(self, script=("Hello", " world", "!"), finish_reason="stop", stats=STATS):
        self.script, self.finish_reason, self.stats = list(script), finish_reason, stats
        self.requests: list[GenerateRequest] = []
        self.ended: dict[str, str] = {}
        self.hanging = asyncio.Event()

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[GenerateChunk, None]:
        self.requests.append(request)
        rid, produced = request.request_id, 0
        try:
            texts = [item for item in self.script if isinstance(item, str)]
            for item in self.script:
                await asyncio.sleep(0)
                if isinstance(item, str):
                    produced += 1
                    last = produced == len(texts) and not any(isinstance(i, tuple) for i in self.script)
                    if last:  # like the DecodeWorker: once the final chunk is out, closing frees nothing
                        self.ended[rid] = "finished"
                    yield GenerateChunk(
                        rid,
                        item,
                        [produced],
                        finished=last,
                        finish_reason=self.finish_reason if last else None,
                        num_prompt_tokens=len(request.prompt_token_ids),
                        num_output_tokens=produced,
                        stats=self.stats if last else None,
                    )
                elif item[0] == "fail":
                    yield GenerateChunk(rid, "", [], finished=True, finish_reason="error", error=item[1])
                elif item[0] == "raise":
                    raise item[1]
                elif item[0] == "hang":
                    self.hanging.set()
                    await asyncio.Event().wait()
        except GeneratorExit:
            self.ended.setdefault(rid, "closed")
            raise
        except asyncio.CancelledError:
            self.ended.setdefault(rid, "cancelled")
            raise


def make_client(decode: ScriptedDecode | None = None, tokenizer: CharTokenizer | None = None, **server_args):
    decode = decode or ScriptedDecode()
    tokenizer = tokenizer or CharTokenizer()
    server = OpenAIServer(tokenizer, decode.generate, server_args.pop("settings", SETTINGS), **server_args)
    return TestClient(build_fastapi_app(server)), decode, tokenizer


def sse_events(text: str) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded except [DONE]; asserts the framing."""
    assert text.endswith("\n\n")
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def post_chat(client: TestClient, headers: dict[str, str] | None = None, **fields):
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, **fields}, headers=headers or {})


# ---------------------------------------------------------------------------------------------- happy paths


def test_non_streaming_chat_has_usage_and_the_mixquant_object():
    client, decode, _ = make_client()
    response = post_chat(client, temperature=0, seed=3, stop=["END"], max_tokens=10)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello world!", "tool_calls": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    prompt_tokens = len("user: hi\nassistant: ")
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 3,
        "total_tokens": prompt_tokens + 3,
        "prompt_tokens_details": {"cached_tokens": 16},
    }
    assert body["mixquant"] == {
        "prefill": "remote",
        "prefill_precision": "nvfp4",
        "cached_tokens_prefill": 16,
        "cached_tokens_decode": 8,
        "kv_transfer_bytes": 4096,
        "kv_transfer_ms": 1.5,
        "queue_ms": 0.5,
        "prefill_ms": 3.0,
        "ttft_ms": 5.0,
        "fallback_reason": None,
        "decode_replica": None,
    }
    [request] = decode.requests
    assert request.request_id == body["id"]
    assert request.sampling == SamplingParams(max_tokens=10, temperature=0.0, seed=3, stop=("END",))
    assert decode.ended == {request.request_id: "finished"}


def test_streaming_chat_chunks_and_usage():
    client, decode, _ = make_client()
    response = post_chat(client, stream=True, stream_options={"include_usage": True})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:-2]]
    assert "".join(content) == "Hello world!" and all(content)
    finish = chunks[-2]
    assert finish["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert finish["mixquant"]["kv_transfer_bytes"] == 4096
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    assert all(c["usage"] is None for c in chunks[:-1])  # OpenAI sends usage: null until the last chunk
    assert list(decode.ended.values()) == ["finished"]


def test_streaming_without_include_usage_has_no_usage_key():
    client, _, _ = make_client()
    chunks = sse_events(post_chat(client, stream=True).text)[:-1]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_default_max_tokens_is_the_room_left_capped():
    client, decode, _ = make_client()
    post_chat(client)
    assert decode.requests[-1].sampling.max_tokens == SETTINGS.max_tokens_cap  # 64 < 200 - prompt
    long_prompt = [{"role": "user", "content": "x" * 150}]
    post_chat(client, messages=long_prompt)
    room = SETTINGS.max_model_len - len(f"user: {'x' * 150}\nassistant: ")
    assert decode.requests[-1].sampling.max_tokens == room < SETTINGS.max_tokens_cap
    post_chat(client, max_completion_tokens=5)
    assert decode.requests[-1].sampling.max_tokens == 5


def test_session_header_names_the_session_else_each_request_gets_its_own():
    client, decode, _ = make_client()
    first = post_chat(client, headers={"x-session-id": "agent-7"})
    assert first.headers["x-session-id"] == "agent-7" and decode.requests[-1].session_id == "agent-7"
    post_chat(client)
    post_chat(client)
    fresh = [r.session_id for r in decode.requests[1:]]
    assert len(set(fresh)) == 2 and all(s.startswith("session-") for s in fresh)
    assert len({r.request_id for r in decode.requests}) == 3


def test_completions_text_and_token_prompts():
    client, decode, _ = make_client()
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": "Once", "max_tokens": 3}).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": "Hello world!", "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"]["prompt_tokens"] == 4 and body["mixquant"]["prefill"] == "remote"
    assert decode.requests[-1].prompt_token_ids == [ord(c) for c in "Once"]
    client.post("/v1/completions", json={"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2})
    assert decode.requests[-1].prompt_token_ids == [5, 6, 7]
    events = sse_events(client.post("/v1/completions", json={"model": MODEL, "prompt": ["Once"], "stream": True}).text)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "Hello world!"
    assert events[-2]["choices"][0]["finish_reason"] == "stop" and events[-2]["object"] == "text_completion"


def test_models_health_stats_and_unknown_routes():
    async def stats():
        return {"decode_replicas": 1}

    client, _, _ = make_client(stats=stats)
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["max_model_len"] == SETTINGS.max_model_len
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/stats").json() == {"decode_replicas": 1}
    missing = client.get("/v1/embeddings")
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}
    assert client.get("/v1/chat/completions").status_code == 405
    without_hook, _, _ = make_client()
    assert without_hook.get("/stats").status_code == 404


# ---------------------------------------------------------------------------------------------- tool calls


def test_tool_calls_non_streaming():
    client, _, tokenizer = make_client(ScriptedDecode(script=[CALL_TEXT[:20], CALL_TEXT[20:]]))
    body = post_chat(client, tools=[WEATHER_TOOL]).json()
    assert tokenizer.templated[-1][1] == [WEATHER_TOOL]
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me look."
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Oslo"}


def test_tool_calls_streaming_hold_back_the_block():
    pieces = [CALL_TEXT[i : i + 7] for i in range(0, len(CALL_TEXT), 7)]
    client, _, _ = make_client(ScriptedDecode(script=pieces))
    chunks = sse_events(post_chat(client, tools=[WEATHER_TOOL], stream=True).text)[:-1]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    content = "".join(d.get("content", "") for d in deltas)
    assert content == "Let me look.\n" and "<" not in content
    [call_delta] = [d for d in deltas if "tool_calls" in d]
    [call] = call_delta["tool_calls"]
    assert call["index"] == 0 and call["function"]["name"] == "get_weather"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_choice_none_neither_renders_nor_parses_tools():
    client, _, tokenizer = make_client(ScriptedDecode(script=[CALL_TEXT]))
    body = post_chat(client, tools=[WEATHER_TOOL], tool_choice="none").json()
    assert tokenizer.templated[-1][1] is None
    assert body["choices"][0]["message"] == {"role": "assistant", "content": CALL_TEXT, "tool_calls": None}
    assert body["choices"][0]["finish_reason"] == "stop"


def test_parallel_tool_calls_false_returns_the_first_call():
    two = CALL_TEXT + '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    client, _, _ = make_client(ScriptedDecode(script=[two]))
    assert len(post_chat(client, tools=[WEATHER_TOOL]).json()["choices"][0]["message"]["tool_calls"]) == 2
    body = post_chat(client, tools=[WEATHER_TOOL], parallel_tool_calls=False).json()
    calls = body["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather"]


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "body, status, param, words",
    [
        ({"messages": USER}, 400, "model", "Field required"),
        ({"model": MODEL}, 400, "messages", "Field required"),
        ({"model": "gpt-4o", "messages": USER}, 404, "model", "'gpt-4o' is not served here"),
        ({"model": MODEL, "messages": USER, "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
        ({"model": MODEL, "messages": USER, "max_tokens": 65}, 400, "max_tokens", "limit of 64"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x" * 190}]}, 400, "messages", "no room for output"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x" * 150}], "max_tokens": 60},
            400,
            "max_tokens",
            "exceed the model's context length of 200",
        ),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x" * 150}], "max_completion_tokens": 60},
            400,
            "max_completion_tokens",
            "ask for at most",
        ),
        ({"model": MODEL, "messages": USER, "temperature": -1}, 400, "temperature", "greater than or equal to 0"),
        ({"model": MODEL, "messages": USER, "n": 2}, 400, "n", "only n=1"),
        ({"model": MODEL, "messages": USER, "logprobs": True}, 400, "logprobs", "not implemented"),
        ({"model": MODEL, "messages": USER, "frobnicate": 1}, 400, "frobnicate", "Unrecognized request argument"),
        ({"model": MODEL, "messages": USER, "tool_choice": "required"}, 400, "tool_choice", "constrained decoding"),
    ],
)
def test_bad_chat_requests_name_the_field_and_never_reach_the_worker(body, status, param, words):
    client, decode, _ = make_client()
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"] and param in error["message"]
    assert error["type"] == "invalid_request_error"
    assert decode.requests == []


@pytest.mark.parametrize(
    "raw, words",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"", "empty"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_malformed_bodies_are_400(raw, words):
    client, decode, _ = make_client()
    response = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400 and words in response.json()["error"]["message"]
    assert decode.requests == []


def test_oversized_bodies_are_413_before_parsing():
    client, decode, _ = make_client()
    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]})
    response = client.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "test-model", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}]}'

    response = client.post("/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert decode.requests == []


@pytest.mark.parametrize("session", ["", "has space", "x" * 129, "caf\u00e9"])
def test_bad_session_ids_are_400(session):
    client, decode, _ = make_client()
    response = post_chat(client, headers={"x-session-id": session.encode("latin-1")})
    assert response.status_code == 400 and response.json()["error"]["param"] == "x-session-id"
    assert decode.requests == []


@pytest.mark.parametrize(
    "prompt, param, words",
    [
        ([], "prompt", "must not be empty"),
        ([1, 300], "prompt", "token id 300 is outside the vocabulary [0, 256)"),
        ("", "prompt", "at least one token"),
        ("y" * 200, "prompt", "no room for output"),
    ],
)
def test_bad_completion_prompts(prompt, param, words):
    client, decode, _ = make_client()
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param and words in response.json()["error"]["message"]
    assert decode.requests == []


def test_a_tokenizer_refusal_is_a_400_on_messages():
    class Refusing(CharTokenizer):
        def apply_chat_template(self, messages, tools=None, add_generation_prompt=True):
            raise ValueError("messages[0].content must be a string")

    client, decode, _ = make_client(tokenizer=Refusing())
    response = post_chat(client)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    assert decode.requests == []


def test_without_a_tokenizer_only_token_prompts_are_served():
    decode = ScriptedDecode(script=["", ""])
    settings = ServerSettings(model_name=MODEL, max_model_len=100, max_tokens_cap=8, vocab_size=1000)
    client = TestClient(build_fastapi_app(OpenAIServer(None, decode.generate, settings)))
    assert post_chat(client).status_code == 400
    assert client.post("/v1/completions", json={"model": MODEL, "prompt": "text"}).status_code == 400
    ok = client.post("/v1/completions", json={"model": MODEL, "prompt": [999, 3]})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    with pytest.raises(ValueError, match="vocab_size"):
        OpenAIServer(None, decode.generate, SETTINGS)


def test_return_token_ids_makes_a_tokenizerless_model_readable_and_ignore_eos_reaches_sampling():
    decode = ScriptedDecode(script=["", "", ""], finish_reason="length")  # no text: token ids 1, 2, 3
    settings = ServerSettings(model_name=MODEL, max_model_len=100, max_tokens_cap=8, vocab_size=1000)
    client = TestClient(build_fastapi_app(OpenAIServer(None, decode.generate, settings)))
    body = {"model": MODEL, "prompt": [999, 3], "max_tokens": 3, "return_token_ids": True, "ignore_eos": True}
    whole = client.post("/v1/completions", json=body).json()
    assert whole["choices"][0]["token_ids"] == [1, 2, 3] and decode.requests[-1].sampling.ignore_eos
    events = sse_events(client.post("/v1/completions", json={**body, "stream": True}).text)[:-1]
    assert [e["choices"][0]["token_ids"] for e in events] == [[1], [2], [3]]  # one event per token, even without text
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    plain = client.post("/v1/completions", json={"model": MODEL, "prompt": [999, 3], "max_tokens": 3}).json()
    assert "token_ids" not in plain["choices"][0] and not decode.requests[-1].sampling.ignore_eos
    silent = sse_events(client.post("/v1/completions", json={"model": MODEL, "prompt": [9], "stream": True}).text)
    assert all("token_ids" not in e["choices"][0] for e in silent[:-1])
    assert client.post("/v1/completions", json={**body, "return_token_ids": "maybe"}).status_code == 400


# ---------------------------------------------------------------------------------------------- failures


@pytest.mark.parametrize("failure", [("fail", "engine exploded"), ("raise", RuntimeError("replica died"))])
def test_failures_before_the_first_token_are_503(failure):
    for stream in (False, True):
        client, decode, _ = make_client(ScriptedDecode(script=[failure]))
        response = post_chat(client, stream=stream)
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "generation_failed"
        assert ("engine exploded" if failure[0] == "fail" else "replica died") in error["message"]


def test_a_failure_mid_stream_is_an_error_event_without_done():
    client, decode, _ = make_client(ScriptedDecode(script=["Hel", ("fail", "decode step failed")]))
    events = sse_events(post_chat(client, stream=True).text)
    assert "[DONE]" not in events
    assert events[1]["choices"][0]["delta"] == {"content": "Hel"}
    assert events[-1]["error"]["message"] == "generation failed: decode step failed"
    non_streaming = make_client(ScriptedDecode(script=["Hel", ("raise", KeyError("k"))]))[0]
    assert post_chat(non_streaming).status_code == 503


def test_a_stream_that_ends_without_a_final_chunk_is_an_error():
    class Truncated(ScriptedDecode):
        async def generate(self, request):
            yield GenerateChunk(request.request_id, "partial", [1])

    client, _, _ = make_client(Truncated())
    assert "without a final chunk" in post_chat(client).json()["error"]["message"]
    assert "error" in sse_events(post_chat(client, stream=True).text)[-1]


# ---------------------------------------------------------------------------------------------- disconnects


async def drive_asgi(app, path: str, body: dict, disconnect: asyncio.Event, spec_version: str = "2.3") -> list[dict]:
    """Runs one HTTP request through the ASGI app; the client 'disconnects' when `disconnect` is set."""
    raw = json.dumps(body).encode()
    sent: list[dict] = []
    delivered = False

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if disconnect.is_set() and spec_version == "2.4":
            raise OSError("connection reset by peer")
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return sent


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("script", [["a", ("hang",)], [("hang",)]], ids=["after-first-token", "before-first-token"])
def test_client_disconnect_cancels_the_worker_stream(stream, script):
    async def scenario():
        decode = ScriptedDecode(script=script)
        app = build_fastapi_app(OpenAIServer(CharTokenizer(), decode.generate, SETTINGS))
        disconnect = asyncio.Event()
        body = {"model": MODEL, "messages": USER, "stream": stream}
        run = asyncio.ensure_future(drive_asgi(app, "/v1/chat/completions", body, disconnect))
        await asyncio.wait_for(decode.hanging.wait(), 5)
        disconnect.set()
        await run
        return decode

    decode = asyncio.run(scenario())
    assert list(decode.ended.values()) in (["cancelled"], ["closed"])


def test_disconnect_noticed_on_send_closes_the_worker_stream():
    """ASGI spec 2.4 servers report a disconnect by failing `send`; the stream must still be closed now."""

    class Endless(ScriptedDecode):
        async def generate(self, request):
            self.requests.append(request)
            try:
                for i in range(10_000):
                    await asyncio.sleep(0.001)
                    if i == 3:
                        self.hanging.set()
                    yield GenerateChunk(request.request_id, "x", [i], num_output_tokens=i + 1)
            finally:
                self.ended[request.request_id] = "closed"

    async def scenario():
        decode = Endless()
        app = build_fastapi_app(OpenAIServer(CharTokenizer(), decode.generate, SETTINGS))
        disconnect = asyncio.Event()
        body = {"model": MODEL, "messages": USER, "stream": True}
        run = asyncio.ensure_future(drive_asgi(app, "/v1/chat/completions", body, disconnect, spec_version="2.4"))
        await asyncio.wait_for(decode.hanging.wait(), 5)
        disconnect.set()
        await run  # the failed send ends the response quietly
        return decode

    decode = asyncio.run(scenario())
    assert list(decode.ended.values()) == ["closed"]


# ---------------------------------------------------------------------------------------------- Serve glue (no cluster)


class FakeResponseGenerator:
    """Serve's DeploymentResponseGenerator: async iteration plus cancel()."""

    def __init__(self, chunks):
        self.chunks, self.cancelled = list(chunks), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.chunks:
            raise StopAsyncIteration
        return self.chunks.pop(0)

    def cancel(self):
        self.cancelled = True


class FakeDecodeHandle:
    def __init__(self, chunks):
        self.chunks, self.calls, self.stream_option = chunks, [], None

    def options(self, stream: bool):
        self.stream_option = stream
        return self

    @property
    def generate(self):
        return self

    def remote(self, request):
        response = FakeResponseGenerator(self.chunks)
        self.calls.append((request, response))
        return response


def test_handle_adapter_streams_and_cancels_only_unfinished_calls():
    chunks = [GenerateChunk("r", "a", [1]), GenerateChunk("r", "b", [2], finished=True, finish_reason="stop")]
    handle = FakeDecodeHandle(chunks)
    generate = decode_handle_generate(handle)
    request = GenerateRequest("r", "s", [1, 2], SamplingParams())

    async def read_all():
        return [chunk async for chunk in generate(request)]

    async def read_one():
        stream = generate(request)
        first = await stream.__anext__()
        await stream.aclose()
        return first

    assert handle.stream_option is True
    assert [c.text_delta for c in asyncio.run(read_all())] == ["a", "b"]
    assert handle.calls[-1][0] is request and not handle.calls[-1][1].cancelled
    assert asyncio.run(read_one()).text_delta == "a"
    assert handle.calls[-1][1].cancelled


def test_importing_the_router_does_not_import_ray():
    code = "import sys, mixquant_serve.router; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[2]))


def test_router_deployment_builds_the_server_and_mounts_every_route(monkeypatch):
    from mixquant_serve.dashboard import collector
    from mixquant_serve.metrics import ReplicaMetrics
    from mixquant_serve.router import ROUTES, router_deployment

    # Outside a Serve replica there is no replica context and no collector to push to.
    monkeypatch.setattr(collector, "serve_replica_metrics", lambda pool, model, precision: ReplicaMetrics(pool, "r0", model, precision))
    monkeypatch.setattr(collector, "start_serve_reporting", lambda metrics, load: None)

    deployment = router_deployment()
    assert deployment.name == "Router"
    router_class = deployment.func_or_class
    handle = FakeDecodeHandle([])

    async def construct():  # what a Serve replica does, without a cluster
        router = router_class.__new__(router_class)
        await router_class.__init__(router, handle, CharTokenizer, SETTINGS)
        return router

    router = asyncio.run(construct())
    assert isinstance(router.server, OpenAIServer) and router.server.settings == SETTINGS
    assert handle.stream_option is True
    paths = router.app.openapi()["paths"]
    assert {(route.path, route.method.lower()) for route in ROUTES} <= {(p, m) for p, ms in paths.items() for m in ms}
    assert {"/dashboard", "/dashboard/api/metrics"} <= set(router.app.openapi()["paths"]) | {getattr(r, "path", "") for r in router.app.routes}


# ------------------------------------------------------------------------------------ real engine, openai client


class InProcessDecode:
    """Drives a LocalPipeline from asyncio like a DecodeWorker: engine calls on one thread, stepping while busy."""

    def __init__(self, pipeline) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.pipeline = pipeline
        self.thread = ThreadPoolExecutor(max_workers=1)
        self.queues: dict[str, asyncio.Queue] = {}
        self.stepping: asyncio.Task | None = None
        self.aborted: list[str] = []

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[GenerateChunk, None]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[request.request_id] = queue
        finished = False
        try:
            report = await loop.run_in_executor(
                self.thread, self.pipeline.start, request.prompt_token_ids, request.sampling, request.request_id
            )
            if self.stepping is None or self.stepping.done():
                self.stepping = loop.create_task(self._step_until_idle())
            while not finished:
                output = await queue.get()
                finished = output.finished
                stats = RequestStats(
                    report.prefill,
                    report.prefill_precision,
                    report.cached_tokens_prefill,
                    report.cached_tokens_decode,
                    report.kv_transfer_bytes,
                    report.kv_transfer_ms,
                    prefill_ms=report.prefill_ms,
                )
                yield GenerateChunk(
                    request.request_id,
                    output.text_delta,
                    output.new_token_ids,
                    finished=output.finished,
                    finish_reason=output.finish_reason,
                    num_prompt_tokens=output.num_prompt_tokens,
                    num_output_tokens=output.num_output_tokens,
                    stats=stats if finished else None,
                )
        finally:
            self.queues.pop(request.request_id, None)
            if not finished:
                self.aborted.append(request.request_id)
                await asyncio.shield(loop.run_in_executor(self.thread, self.pipeline.decode.abort, request.request_id))

    async def _step_until_idle(self) -> None:
        loop = asyncio.get_running_loop()
        while await loop.run_in_executor(self.thread, self.pipeline.decode.has_unfinished):
            for output in await loop.run_in_executor(self.thread, self.pipeline.decode.step):
                queue = self.queues.get(output.request_id)
                if queue is not None:
                    queue.put_nowait(output)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_real_engine_through_uvicorn_with_the_openai_client(bundled):
    import openai
    import uvicorn

    from mixquant_serve.engine.build import build_local_pipeline
    from mixquant_serve.engine.config import EngineConfig

    import torch

    pipeline, _ = build_local_pipeline(
        "bundled:smollm2-135m-instruct",
        prefill_precision="nvfp4",
        device=torch.device("cpu"),
        engine_config=EngineConfig(block_size=16, num_kv_blocks=64),
        loaded=bundled,
    )
    decode = InProcessDecode(pipeline)
    max_model_len = pipeline.decode.core.max_model_len
    settings = ServerSettings(model_name="smollm2", max_model_len=max_model_len, max_tokens_cap=256)
    server = OpenAIServer(bundled.tokenizer, decode.generate, settings)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(build_fastapi_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not uv.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "Name three colors."}]

        reply = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8, temperature=0)
        streamed = client.chat.completions.create(
            model="smollm2",
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(streamed)
        streamed_text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        prompt_ids = bundled.tokenizer.apply_chat_template(messages)
        direct = pipeline.generate(prompt_ids, SamplingParams(max_tokens=8, temperature=0.0))
        assert reply.choices[0].message.content == direct.text == streamed_text
        assert reply.choices[0].finish_reason == direct.finish_reason
        assert reply.usage.prompt_tokens == len(prompt_ids) and reply.usage.completion_tokens == len(direct.token_ids)
        assert chunks[-1].usage.completion_tokens == len(direct.token_ids)
        extra = reply.model_extra["mixquant"]
        assert extra["prefill"] == "remote" and extra["prefill_precision"] == "nvfp4" and extra["kv_transfer_bytes"] > 0

        # a client that leaves mid-stream: the request is aborted and every KV block is free again
        story = [{"role": "user", "content": "Tell me a very long story about a dragon."}]
        leaving = client.chat.completions.create(
            model="smollm2", messages=story, max_tokens=200, temperature=0, stream=True
        )
        with leaving:
            for chunk in leaving:
                if chunk.choices and chunk.choices[0].delta.content:
                    break
        deadline = time.monotonic() + 20
        while pipeline.decode.core.block_manager.num_used_blocks or pipeline.prefill.pinned:
            assert time.monotonic() < deadline, "KV blocks were not freed after the client left"
            time.sleep(0.05)
        assert len(decode.aborted) == 1
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
