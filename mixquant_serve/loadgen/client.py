"""One streamed chat turn against an OpenAI-compatible endpoint, timed at the client.

TTFT: request sent -> first SSE event carrying output text (or, for token sessions over
/v1/completions with `return_token_ids`, output token ids). ITL: gaps between consecutive such
events (one token per event from mixquant-serve, so per token). E2E: request sent ->
`[DONE]`. Usage (prompt, completion and cached tokens) comes from the final usage chunk
(`stream_options.include_usage`); `mixquant` stats (where prefill ran) from the finish chunk.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

SESSION_HEADER = "x-session-id"


@dataclass
class TurnResult:
    session_id: str
    turn: int
    started_at: float  # wall clock (time.time())
    ok: bool
    error: str | None = None  # "http 503", "timeout", ... for failed turns
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float = 0.0
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prefill: str | None = None  # local | remote (mixquant-serve only)
    kv_transfer_bytes: int = 0  # mixquant-serve only: KV bytes pulled from the prefill pool, and how long it took
    kv_transfer_ms: float = 0.0
    prefill_ms: float = 0.0  # mixquant-serve only: the prefill replica's compute time (remote prefills)
    token_ids: list[int] = field(default_factory=list)  # the reply's ids (token sessions only)


async def stream_chat_turn(
    client: httpx.AsyncClient,
    base_url: str,
    model: str,
    messages: list[dict[str, str]],
    max_tokens: int,
    session_id: str,
    turn: int,
    api_key: str | None = None,
) -> TurnResult:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return await _stream_turn(client, f"{base_url.rstrip('/')}/v1/chat/completions", body, session_id, turn, api_key)


async def stream_completion_turn(
    client: httpx.AsyncClient,
    base_url: str,
    model: str,
    prompt_ids: list[int],
    max_tokens: int,
    session_id: str,
    turn: int,
    api_key: str | None = None,
) -> TurnResult:
    """A turn of a token session: /v1/completions with token ids in, token ids out (`return_token_ids`),
    exactly `max_tokens` of them (`ignore_eos`); events carrying token ids time TTFT and ITL."""
    body = {
        "model": model,
        "prompt": prompt_ids,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return await _stream_turn(client, f"{base_url.rstrip('/')}/v1/completions", body, session_id, turn, api_key)


async def _stream_turn(
    client: httpx.AsyncClient, url: str, body: dict, session_id: str, turn: int, api_key: str | None
) -> TurnResult:
    """Streams one request; output events are chat deltas with content, or completion choices with text or ids."""
    headers = {SESSION_HEADER: session_id}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    result = TurnResult(session_id, turn, time.time(), ok=False)
    started = previous = time.perf_counter()
    parts: list[str] = []
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode("utf-8", "replace")[:200]
                result.error = f"http {response.status_code}: {detail}"
                result.e2e_s = time.perf_counter() - started
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    result.ok = result.error is None
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = f"stream error: {event['error'].get('message', '')[:200]}"
                    continue
                now = time.perf_counter()
                for choice in event.get("choices", []):
                    content = (choice.get("delta") or {}).get("content") or choice.get("text")
                    ids = choice.get("token_ids") or []
                    if content or ids:
                        if result.ttft_s is None:
                            result.ttft_s = now - started
                        else:
                            result.itl_s.append(now - previous)
                        previous = now
                        parts.append(content or "")
                        result.token_ids.extend(ids)
                stats = event.get("mixquant")
                if stats:
                    result.prefill = stats.get("prefill")
                    result.kv_transfer_bytes = stats.get("kv_transfer_bytes", 0) or 0
                    result.kv_transfer_ms = stats.get("kv_transfer_ms", 0.0) or 0.0
                    result.prefill_ms = stats.get("prefill_ms", 0.0) or 0.0
                usage = event.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens", 0)
                    result.completion_tokens = usage.get("completion_tokens", 0)
                    result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0) or 0
            else:
                result.error = result.error or "stream ended without [DONE]"
    except httpx.TimeoutException:
        result.error = "timeout"
    except httpx.HTTPError as error:
        result.error = f"{type(error).__name__}: {error}"[:200]
    result.e2e_s = time.perf_counter() - started
    result.text = "".join(parts)
    return result
