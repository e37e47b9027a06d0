"""Messages between the Serve deployments: Router -> DecodeWorker -> PrefillWorker.

Plain dataclasses (picklable, no Ray import), so the engine-side code and tests use them without a
cluster.

    Router ──GenerateRequest──▶ DecodeWorker.generate (streaming) ──GenerateChunk*──▶ Router
    DecodeWorker ──PrefillRequest──▶ PrefillWorker.prefill ──PrefillResponse──▶ DecodeWorker
    DecodeWorker ──NIXL READ of the blocks + notification──▶ PrefillWorker (unpins them)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mixquant_serve.engine.sampling import SamplingParams


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    session_id: str  # agent session (x-session-id); a fresh id per request when the client sends none
    prompt_token_ids: list[int]
    sampling: SamplingParams


@dataclass
class RequestStats:
    """Where a request's latency went; the `mixquant` object of a non-streaming response."""

    prefill: Literal["remote", "local"]
    prefill_precision: str
    cached_tokens_prefill: int = 0
    cached_tokens_decode: int = 0
    kv_transfer_bytes: int = 0
    kv_transfer_ms: float = 0.0
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    fallback_reason: str | None = None
    decode_replica: str | None = None  # which decode replica served the request (Serve's replica id)


@dataclass
class GenerateChunk:
    """One streamed piece of output. The last chunk has finished=True, finish_reason and stats."""

    request_id: str
    text_delta: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    stats: RequestStats | None = None
    error: str | None = None  # set with finish_reason="error": the request failed on the worker


@dataclass(frozen=True)
class SessionRoute:
    """First argument of a handle call that must reach the replica serving `session_id` (the routers hash it)."""

    session_id: str


@dataclass(frozen=True)
class PrefillRequest:
    request_id: str
    session_id: str
    token_ids: list[int]  # prompt[:-1]: the decode worker computes the last prompt token itself
    decode_agent: str  # NIXL agent name of the decode replica that will pull (for the notification)


@dataclass
class PrefillResponse:
    request_id: str
    prefill_agent: str  # NIXL agent name of the prefill replica holding the blocks
    agent_metadata: bytes  # that replica's transport metadata, for a first contact or after a restart
    metadata_version: str  # changes when the replica (and its NIXL agent) restarts
    block_ids: list[int]
    num_tokens: int
    num_cached_tokens: int
    prefill_ms: float
    queue_ms: float
    precision: str
    lease_seconds: float = field(default=30.0)
