"""One streamed chat turn against an OpenAI-compatible endpoint, timed at the client.

TTFT: request sent -> first SSE event carrying output text. ITL: gaps between consecutive events
carrying output text (one token per event from mixquant-serve, so per token). E2E: request sent ->
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
    headers = {SESSION_HEADER: session_id}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    result = TurnResult(session_id, turn, time.time(), ok=False)
    started = previous = time.perf_counter()
    parts: list[str] = []
    try:
        async with client.stream("POST", f"{base_url.rstrip('/')}/v1/chat/completions", json=body, headers=headers) as response:
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
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        if result.ttft_s is None:
                            result.ttft_s = now - started
                        else:
                            result.itl_s.append(now - previous)
                        previous = now
                        parts.append(content)
                if event.get("mixquant"):
                    result.prefill = event["mixquant"].get("prefill")
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
