"""DecodeWorker: the precise decode pool's replica, and the orchestrator of each of its requests.

    Router ──GenerateRequest──▶ [DecodeWorker] ──PrefillRequest──▶ PrefillWorker (quantized)
               ◀──GenerateChunk stream──  │ ◀── block ids + metadata ──┘
                                          └── NIXL READ of exactly the missing blocks, notify

Per request: look up the prompt in this replica's prefix cache; if at most `local_prefill_tokens`
tokens before the last are uncached, prefill them here in the decode precision (no transfer);
otherwise reserve blocks, have a prefill replica (chosen by session) compute prompt[:-1], pull the
blocks this replica lacks, and compute the last prompt token here. Any failure on the remote path
(prefill error or timeout, pull error or timeout, no room to reserve) falls back to a local prefill
and is counted. Every sampled token comes from this replica's weights.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from mixquant_serve.engine.decode_engine import DecodeEngine
from mixquant_serve.engine.output import RequestOutput
from mixquant_serve.metrics import ReplicaMetrics
from mixquant_serve.protocol import GenerateChunk, GenerateRequest, PrefillRequest, PrefillResponse, RequestStats
from mixquant_serve.transfer.base import KVTransferError, KVTransport, TransferStats
from mixquant_serve.transfer.faults import ArmedFaults, FaultPlan
from workers.engine_thread import EngineThread


@dataclass
class DecodeParts:
    engine: DecodeEngine
    transport: KVTransport
    faults: ArmedFaults | None = None  # the transport's fault injector, on test deployments only


DecodeFactory = Callable[[str], DecodeParts]  # agent name -> parts


@dataclass(frozen=True)
class DecodeSettings:
    local_prefill_tokens: int
    prefill_timeout_s: float
    kv_transfer_timeout_s: float


class DecodeWorker:
    def __init__(self, factory: DecodeFactory, prefill: Any, settings: DecodeSettings, replica_name: str = "decode",
                 metrics: ReplicaMetrics | None = None):
        """`prefill` is the PrefillWorker deployment handle: `await prefill.prefill.remote(PrefillRequest)`;
        None when the app has no prefill pool (co-located serving: every prompt is prefilled here).

        `metrics` records each finished request (mixquant_serve.metrics); default: kept in memory only.
        """
        self.agent_name = f"{replica_name}-{uuid.uuid4().hex[:12]}"
        parts = factory(self.agent_name)
        self.engine, self.transport = parts.engine, parts.transport
        self.faults = parts.faults
        self.replica_name = replica_name
        self.transport.register_cache(self.engine.kv_cache)
        self.prefill_handle = prefill
        self.settings = settings
        self.thread = EngineThread("decode-engine")
        self.transfer_thread = EngineThread("kv-pull")  # pulls block while the engine keeps stepping
        self._peer_versions: dict[str, str] = {}
        self._queues: dict[str, asyncio.Queue[RequestOutput | Exception]] = {}
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self.metrics = metrics if metrics is not None else ReplicaMetrics("decode", replica_name, "", self.engine.core.precision)
        self._admission_waits: dict[str, float] = {}  # request id -> seconds it waited for the engine thread
        self.counters = {
            "requests": 0,
            "local_prefills": 0,
            "remote_prefills": 0,
            "fallbacks": 0,
            "aborted": 0,  # ended before their final chunk: client gone, cancelled, or failed
            "peer_handshakes": 0,  # NIXL handshakes with prefill replicas (first contact or after a restart)
        }

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        self._ensure_loop()
        started = time.perf_counter()
        queue: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        self._queues[request.request_id] = queue
        finished = False
        self.counters["requests"] += 1
        try:
            stats = await self._admit(request)
            self._wakeup.set()
            while True:
                output = await queue.get()
                if isinstance(output, Exception):
                    yield GenerateChunk(request.request_id, "", [], finished=True, finish_reason="error", error=repr(output))
                    return
                if not stats.ttft_ms:
                    stats.ttft_ms = (time.perf_counter() - started) * 1e3
                finished = output.finished
                if finished:  # recorded before the last yield: the caller may close the stream right after it
                    admission_wait = self._admission_waits.pop(request.request_id, 0.0)
                    self.metrics.record_decode_request(stats, admission_wait, output.num_prompt_tokens, output.num_output_tokens)
                yield GenerateChunk(
                    request_id=request.request_id,
                    text_delta=output.text_delta,
                    token_ids=output.new_token_ids,
                    finished=output.finished,
                    finish_reason=output.finish_reason,
                    num_prompt_tokens=output.num_prompt_tokens,
                    num_output_tokens=output.num_output_tokens,
                    stats=stats if output.finished else None,
                )
                if finished:
                    return
        finally:
            self._queues.pop(request.request_id, None)
            self._admission_waits.pop(request.request_id, None)
            if not finished:  # client gone, cancelled, or failed: free the blocks now
                self.counters["aborted"] += 1
                await asyncio.shield(self.thread.call(self.engine.abort, request.request_id))

    def load(self) -> dict[str, float]:
        manager = self.engine.core.block_manager
        scheduler = self.engine.core.scheduler
        return {
            "running_seqs": float(len(scheduler.running)),
            "waiting_seqs": float(len(scheduler.waiting)),
            "kv_block_usage": manager.num_used_blocks / manager.num_blocks,
            **{k: float(v) for k, v in self.counters.items()},
        }

    async def _admit(self, request: GenerateRequest) -> RequestStats:
        """Puts the request into the engine, prefilled remotely or locally; returns how it went."""
        engine, prompt, rid = self.engine, request.prompt_token_ids, request.request_id
        lookup_started = time.perf_counter()
        cached = await self.thread.call(engine.num_cached_tokens, prompt)
        self._admission_waits[rid] = time.perf_counter() - lookup_started  # the decode pool's queue wait
        uncached = len(prompt) - 1 - cached
        local = RequestStats("local", engine.core.precision, cached_tokens_decode=cached, decode_replica=self.replica_name)
        if self.prefill_handle is None or uncached <= self.settings.local_prefill_tokens:
            await self.thread.call(engine.add_request, rid, prompt, request.sampling)
            self.counters["local_prefills"] += 1
            return local
        reservation = await self.thread.call(engine.reserve_for_transfer, rid, prompt, request.sampling)
        if reservation is None:
            return await self._fall_back(request, local, "decode KV cache full", reserved=False)
        try:
            response: PrefillResponse = await asyncio.wait_for(
                self.prefill_handle.prefill.remote(PrefillRequest(rid, request.session_id, prompt[:-1], self.agent_name)),
                timeout=self.settings.prefill_timeout_s,
            )
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as error:  # prefill replica died, timed out, or rejected the request
            return await self._fall_back(request, local, f"prefill failed: {error!r}"[:300], reserved=True)
        stats = RequestStats(
            "remote",
            response.precision,
            cached_tokens_prefill=response.num_cached_tokens,
            cached_tokens_decode=reservation.num_cached_tokens,
            prefill_ms=response.prefill_ms,
            queue_ms=response.queue_ms,
            decode_replica=self.replica_name,
        )
        remote_block_ids = response.block_ids[reservation.first_block_index :]
        pull = asyncio.ensure_future(
            self.transfer_thread.call(self._pull, response, remote_block_ids, reservation.local_block_ids, rid)
        )
        try:
            pulled = await asyncio.shield(pull)
        except (asyncio.CancelledError, GeneratorExit):
            # The pull thread keeps writing into the reserved blocks until its read ends (at the latest at
            # kv_transfer_timeout_s): free them only then, and unpin the prefill side if the read did not.
            await asyncio.shield(self._abort_after_pull(pull, response.prefill_agent, rid))
            raise
        except Exception as error:
            if response.prefill_agent in self._peer_versions:
                await self.transfer_thread.call(self._release_remote, response.prefill_agent, rid)
            return await self._fall_back(request, local, f"kv transfer failed: {error!r}"[:300], reserved=True)
        await self.thread.call(engine.commit_transfer, rid, True)
        stats.kv_transfer_bytes, stats.kv_transfer_ms = pulled.bytes, pulled.seconds * 1e3
        self.counters["remote_prefills"] += 1
        return stats

    async def _fall_back(self, request: GenerateRequest, stats: RequestStats, reason: str, reserved: bool) -> RequestStats:
        if reserved:
            await self.thread.call(self.engine.commit_transfer, request.request_id, False)
        else:
            await self.thread.call(self.engine.add_request, request.request_id, request.prompt_token_ids, request.sampling)
        self.counters["fallbacks"] += 1
        self.counters["local_prefills"] += 1
        stats.fallback_reason = reason
        return stats

    def _pull(self, response: PrefillResponse, remote_block_ids: list[int], local_block_ids: list[int], rid: str) -> TransferStats:
        """On the pull thread: handshake if needed, then read the blocks (the read notifies the prefill replica)."""
        peer = self._ensure_peer(response)
        return self.transport.read_blocks(
            peer, remote_block_ids, local_block_ids, rid.encode(), self.settings.kv_transfer_timeout_s
        )

    async def _abort_after_pull(self, pull: asyncio.Future, prefill_agent: str, rid: str) -> None:
        """A cancelled request's pull: wait for the read to end, then free the decode blocks and the pinned ones."""
        try:
            await pull
        except Exception:  # the read failed, so it did not notify: ask the prefill replica to unpin now
            if prefill_agent in self._peer_versions:
                await self.transfer_thread.call(self._release_remote, prefill_agent, rid)
        await self.thread.call(self.engine.abort, rid)

    def _ensure_peer(self, response: PrefillResponse) -> str:
        """(Re)handshakes with a prefill replica the first time and after it restarted."""
        if self._peer_versions.get(response.prefill_agent) != response.metadata_version:
            name = self.transport.add_peer(response.agent_metadata)
            self._peer_versions[name] = response.metadata_version
            self.counters["peer_handshakes"] += 1
        return response.prefill_agent

    def arm_transfer_fault(self, plan: FaultPlan) -> str:
        """Test deployments: arm a fault in this replica's transport; returns the replica's name."""
        if self.faults is None:
            raise RuntimeError(
                "transfer fault injection is off for this replica: deploy with decode.transfer_fault_injection: true"
            )
        self.faults.arm(plan)
        return self.replica_name

    def _release_remote(self, peer: str, request_id: str) -> None:
        """Best effort, on the pull thread: tell the prefill replica holding the blocks to unpin them now.

        A Serve handle call would land on an arbitrary replica, so the message travels over the KV
        transport to that replica's agent. If it cannot be delivered, the replica's lease frees them.
        """
        try:
            self.transport.send_notification(peer, request_id.encode())
        except KVTransferError:
            pass

    def _ensure_loop(self) -> None:
        if self._loop_task is None:
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            if not self.engine.has_unfinished():
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            try:
                outputs = await self.thread.call(self.engine.step)
            except Exception as error:  # an engine bug must fail its requests, not hang them
                await self.thread.call(self._abort_all)
                for queue in self._queues.values():
                    queue.put_nowait(error)
                continue
            for output in outputs:
                queue = self._queues.get(output.request_id)
                if queue is not None:
                    queue.put_nowait(output)

    def _abort_all(self) -> None:
        for request_id in list(self._queues):
            self.engine.abort(request_id)
