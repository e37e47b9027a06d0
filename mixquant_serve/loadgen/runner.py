"""The load loop: `concurrency` agent sessions in flight, each running its turns with think time.

    worker 1: session A turn 1 ─think─ turn 2 ─think─ ... turn N │ session D turn 1 ...
    worker 2: session B turn 1 ─think─ turn 2 ...
    ...                    (until max_requests turns were started, or duration_s has passed)

Bounded in count and in time: no turn starts after either bound, and turns still running at the
end of `duration_s` get at most `drain_timeout_s` more before they are cancelled (counted as errors).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import httpx

from mixquant_serve.loadgen.client import TurnResult, stream_chat_turn, stream_completion_turn
from mixquant_serve.loadgen.sessions import TOKEN_ID_LOW, AgentSession, TokenAgentSession

PROMPT_MODES = ("chat", "tokens")


@dataclass(frozen=True)
class LoadConfig:
    base_url: str
    model: str | None = None  # None: the first model of GET /v1/models
    concurrency: int = 4  # sessions in flight
    turns: int = 4  # turns per session
    think_time_s: float = 0.5  # pause between a reply and the session's next turn
    tool_result_tokens: int = 400
    max_tokens: int = 32
    duration_s: float | None = 120.0
    max_requests: int | None = None
    request_timeout_s: float = 300.0
    drain_timeout_s: float = 60.0
    seed: int = 0
    api_key: str | None = None
    prompt_mode: str = "chat"  # chat: /v1/chat/completions with text; tokens: /v1/completions with token ids
    vocab_limit: int = 32000  # tokens mode: ids are drawn below this (must be within the model's vocabulary)

    def __post_init__(self) -> None:
        if self.prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompt_mode must be one of {PROMPT_MODES}, got {self.prompt_mode!r}")
        if self.vocab_limit <= TOKEN_ID_LOW:
            raise ValueError(f"vocab_limit must be > {TOKEN_ID_LOW}, got {self.vocab_limit}")
        for name in ("concurrency", "turns", "tool_result_tokens", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("think_time_s", "drain_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.duration_s is None and self.max_requests is None:
            raise ValueError("duration_s or max_requests: at least one bound is required")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {self.max_requests}")


@dataclass
class LoadRun:
    config: LoadConfig
    model: str
    started_at: float  # wall clock
    finished_at: float
    results: list[TurnResult]
    sessions_started: int


async def discover_model(client: httpx.AsyncClient, base_url: str, api_key: str | None) -> str:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    response = await client.get(f"{base_url.rstrip('/')}/v1/models", headers=headers)
    response.raise_for_status()
    models = response.json().get("data") or []
    if not models:
        raise ValueError(f"base_url: {base_url}/v1/models lists no model")
    return models[0]["id"]


def new_session(config: LoadConfig, session_id: str, seed: int) -> AgentSession | TokenAgentSession:
    if config.prompt_mode == "tokens":
        return TokenAgentSession(session_id, config.turns, config.tool_result_tokens, seed, config.vocab_limit)
    return AgentSession(session_id, config.turns, config.tool_result_tokens, seed)


async def send_turn(
    client: httpx.AsyncClient, config: LoadConfig, model: str, session: AgentSession | TokenAgentSession
) -> TurnResult:
    turn = session.turns_done + 1
    if isinstance(session, TokenAgentSession):
        return await stream_completion_turn(client, config.base_url, model, session.prompt(), config.max_tokens,
                                            session.session_id, turn, config.api_key)
    return await stream_chat_turn(client, config.base_url, model, session.messages(), config.max_tokens,
                                  session.session_id, turn, config.api_key)


async def run_load(config: LoadConfig, on_turn: Callable[[TurnResult], None] | None = None) -> LoadRun:
    """Runs the load; `on_turn` is called after every finished turn (progress bars)."""
    timeout = httpx.Timeout(config.request_timeout_s, connect=30.0)
    limits = httpx.Limits(max_connections=config.concurrency + 2, max_keepalive_connections=config.concurrency + 2)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        model = config.model or await discover_model(client, config.base_url, config.api_key)
        started_wall, started = time.time(), time.monotonic()
        deadline = started + config.duration_s if config.duration_s is not None else None
        results: list[TurnResult] = []
        budget = {"requests": 0, "sessions": 0}

        def may_start_turn() -> bool:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            return config.max_requests is None or budget["requests"] < config.max_requests

        async def worker(index: int) -> None:
            while may_start_turn():
                seed = config.seed * 1_000_003 + budget["sessions"]
                budget["sessions"] += 1
                session = new_session(config, f"load-{uuid.uuid4().hex[:12]}", seed)
                while not session.finished and may_start_turn():
                    budget["requests"] += 1
                    result = await send_turn(client, config, model, session)
                    results.append(result)
                    if on_turn is not None:
                        on_turn(result)
                    if not result.ok:
                        break  # a failed turn ends its session: its history would no longer be an agent's
                    session.add_reply(result.token_ids if config.prompt_mode == "tokens" else result.text)
                    if not session.finished and config.think_time_s > 0:
                        await asyncio.sleep(config.think_time_s)

        tasks = [asyncio.ensure_future(worker(i)) for i in range(config.concurrency)]
        limit = None if deadline is None else max(0.0, deadline - time.monotonic()) + config.drain_timeout_s
        done, pending = await asyncio.wait(tasks, timeout=limit)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()  # a bug in the loop itself must not pass silently
        cancelled = len(pending)
        for _ in range(cancelled):
            results.append(TurnResult("(cancelled)", 0, time.time(), ok=False, error="cancelled at the end of the run"))
        return LoadRun(config, model, started_wall, time.time(), results, budget["sessions"])
