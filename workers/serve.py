"""The Serve-facing replica classes: each wraps a worker, built from the AppConfig in the replica.

    Router ──▶ DecodeReplica (wraps DecodeWorker) ──▶ PrefillReplica (wraps PrefillWorker)

The workers take an engine factory and know nothing of Serve; these thin classes add what Serve
looks up on a deployment class (`record_autoscaling_stats` for the per-pool policies) and build
the engines from the config inside the replica process.
"""

from __future__ import annotations

import functools
from typing import Any, AsyncIterator

from mixquant_serve.config import AppConfig
from mixquant_serve.protocol import GenerateChunk, GenerateRequest, PrefillRequest, PrefillResponse
from workers.decode import DecodeSettings, DecodeWorker
from workers.factories import build_decode_parts, build_prefill_parts
from workers.prefill import PrefillWorker


class PrefillReplica:
    def __init__(self, config: AppConfig):
        self.worker = PrefillWorker(functools.partial(build_prefill_parts, config))

    async def prefill(self, request: PrefillRequest) -> PrefillResponse:
        return await self.worker.prefill(request)

    def record_autoscaling_stats(self) -> dict[str, float]:
        return self.worker.load()

    def load(self) -> dict[str, float]:
        return self.worker.load()


class DecodeReplica:
    def __init__(self, config: AppConfig, prefill: Any):
        settings = DecodeSettings(
            local_prefill_tokens=config.decode.local_prefill_tokens,
            prefill_timeout_s=config.decode.prefill_timeout_s,
            kv_transfer_timeout_s=config.decode.kv_transfer_timeout_s,
        )
        self.worker = DecodeWorker(functools.partial(build_decode_parts, config), prefill, settings)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        async for chunk in self.worker.generate(request):
            yield chunk

    def record_autoscaling_stats(self) -> dict[str, float]:
        return self.worker.load()

    def load(self) -> dict[str, float]:
        return self.worker.load()
