"""PrefillWorker: the quantized prefill pool's replica.

    Router ─▶ DecodeWorker ──PrefillRequest──▶ [PrefillWorker]  (NVFP4 / FP8 prefill)
                   ▲                                 │ PrefillResponse: block ids + NIXL metadata
                   └────────── NIXL READ of the blocks, then a notification ◀┘

It computes the KV of prompt[:-1] (attending over its own cached prefix), pins the blocks and
answers with their ids and its transport metadata. The blocks are released when the decode replica's
notification arrives (the pull is done) or when the lease expires, and stay in the prefix cache for
the session's next turn.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from mixquant_serve.engine.prefill_engine import PrefillEngine, PrefillResult
from mixquant_serve.metrics import ReplicaMetrics
from mixquant_serve.protocol import PrefillRequest, PrefillResponse
from mixquant_serve.transfer.base import KVTransport
from workers.engine_thread import EngineThread

IDLE_POLL_S = 0.02  # how often an idle replica checks for pull notifications and expired leases


@dataclass
class PrefillParts:
    """What a PrefillWorker runs on; built by an engine factory so tests can pass a tiny model."""

    engine: PrefillEngine
    transport: KVTransport


PrefillFactory = Callable[[str], PrefillParts]  # agent name -> parts


class PrefillWorker:
    def __init__(self, factory: PrefillFactory, metrics: ReplicaMetrics | None = None):
        """`metrics` records each finished prefill (mixquant_serve.metrics); default: kept in memory only."""
        self.agent_name = f"prefill-{uuid.uuid4().hex[:12]}"
        parts = factory(self.agent_name)
        self.engine, self.transport = parts.engine, parts.transport
        self.metrics = metrics if metrics is not None else ReplicaMetrics("prefill", self.agent_name, "", self.engine.core.precision)
        self.transport.register_cache(self.engine.kv_cache)
        self.metadata = self.transport.metadata()
        self.metadata_version = uuid.uuid4().hex  # new on every start: decode replicas re-handshake
        self.thread = EngineThread("prefill-engine")
        self._pending: dict[str, asyncio.Future[PrefillResult]] = {}
        self._queued_at: dict[str, float] = {}
        self._queued_tokens = 0
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self.num_released_by_notification = 0
        self.num_released_by_lease = 0

    async def prefill(self, request: PrefillRequest) -> PrefillResponse:
        self._ensure_loop()
        future: asyncio.Future[PrefillResult] = asyncio.get_running_loop().create_future()
        self._pending[request.request_id] = future
        self._queued_at[request.request_id] = time.perf_counter()
        self._queued_tokens += len(request.token_ids)
        try:
            await self.thread.call(self.engine.add_request, request.request_id, request.token_ids)
            self._wakeup.set()
            result = await future
        except BaseException:
            self._pending.pop(request.request_id, None)
            await self.thread.call(self.engine.abort, request.request_id)
            raise
        finally:
            self._queued_tokens -= len(request.token_ids)
            queued_at = self._queued_at.pop(request.request_id)
        total_ms = (time.perf_counter() - queued_at) * 1e3
        queue_ms = max(0.0, total_ms - result.seconds * 1e3)
        self.metrics.record_prefill(result.num_tokens, result.num_cached_tokens, result.seconds, queue_ms / 1e3)
        return PrefillResponse(
            request_id=request.request_id,
            prefill_agent=self.agent_name,
            agent_metadata=self.metadata,
            metadata_version=self.metadata_version,
            block_ids=result.block_ids,
            num_tokens=result.num_tokens,
            num_cached_tokens=result.num_cached_tokens,
            prefill_ms=result.seconds * 1e3,
            queue_ms=queue_ms,
            precision=self.engine.core.precision,
            lease_seconds=self.engine.core.config.kv_lease_seconds,
        )

    async def release(self, request_id: str) -> bool:
        """Unpins a request's blocks now (the decode side gave up on the pull)."""
        return await self.thread.call(self.engine.release, request_id)

    def load(self) -> dict[str, float]:
        """The pool's autoscaling signal and the dashboard's per-replica numbers."""
        manager = self.engine.core.block_manager
        return {
            "queued_prefill_tokens": float(self._queued_tokens),
            "pending_requests": float(len(self._pending)),
            "pinned_requests": float(len(self.engine.pinned)),
            "kv_block_usage": manager.num_used_blocks / manager.num_blocks,
            "released_by_notification": float(self.num_released_by_notification),
            "released_by_lease": float(self.num_released_by_lease),
        }

    def _ensure_loop(self) -> None:
        if self._loop_task is None:
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            if not self.engine.has_unfinished():
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=IDLE_POLL_S)
                except asyncio.TimeoutError:
                    pass
                self._wakeup.clear()
            results = await self.thread.call(self._step_and_release)
            for result in results:
                future = self._pending.pop(result.request_id, None)
                if future is not None and not future.done():
                    future.set_result(result)
                elif future is None:  # the caller went away: nobody will pull these blocks
                    await self.thread.call(self.engine.release, result.request_id)

    def _step_and_release(self) -> list[PrefillResult]:
        """On the engine thread: one step, then unpin what decode replicas pulled or what expired."""
        results = self.engine.step() if self.engine.has_unfinished() else []
        for _, message in self.transport.get_notifications():
            if self.engine.release(message.decode()):
                self.num_released_by_notification += 1
        self.num_released_by_lease += len(self.engine.expire_leases())
        return results
