"""The Serve-facing replica classes: each wraps a worker, built from the AppConfig in the replica.

    Router ──▶ DecodeReplica (wraps DecodeWorker) ──▶ PrefillReplica (wraps PrefillWorker)

The workers take an engine factory and know nothing of Serve; these thin classes add what Serve
looks up on a deployment class (`record_autoscaling_stats` for the per-pool policies,
`record_routing_stats` for the session routers) and build
the engines from the config inside the replica process.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, AsyncIterator

from ray import serve

from mixquant_serve.config import AppConfig
from mixquant_serve.dashboard.collector import serve_replica_metrics, start_serve_reporting
from mixquant_serve.model.checkpoint import open_checkpoint
from mixquant_serve.protocol import GenerateChunk, GenerateRequest, PrefillRequest, PrefillResponse, SessionRoute
from mixquant_serve.quant.precision import resolve_precision
from mixquant_serve.transfer.faults import FaultPlan
from workers.decode import DecodeSettings, DecodeWorker
from workers.factories import build_decode_parts, build_prefill_parts, resolve_device
from workers.prefill import PrefillWorker


def served_model_name(config: AppConfig) -> str:
    """The `model` label of this app's metrics: the name the Router serves (see app.py's ServerSettings)."""
    if config.served_model_name:
        return config.served_model_name
    cache_dir = Path(config.model_cache_dir) if config.model_cache_dir else None
    return open_checkpoint(config.model, cache_dir=cache_dir, progress=False).name.lower()


class PrefillReplica:
    def __init__(self, config: AppConfig):
        precision = resolve_precision(config.prefill.precision, resolve_device(config.device))
        metrics = serve_replica_metrics("prefill", served_model_name(config), precision)
        self.worker = PrefillWorker(functools.partial(build_prefill_parts, config), metrics)
        self.metrics_reporter = start_serve_reporting(metrics, self.worker.load)  # to the dashboard's collector

    async def prefill(self, request: PrefillRequest) -> PrefillResponse:
        return await self.worker.prefill(request)

    def record_autoscaling_stats(self) -> dict[str, float]:
        return self.worker.load()

    def record_routing_stats(self) -> dict[str, float]:
        return self.worker.load()

    def load(self) -> dict[str, float]:
        return self.worker.load()

    def replica_stats(self) -> dict[str, Any]:
        """This replica's Serve id and load (operators and leak checks call it until every replica answered)."""
        return {"replica": serve.get_replica_context().replica_id.unique_id, **self.worker.load()}


class DecodeReplica:
    def __init__(self, config: AppConfig, prefill: Any):
        settings = DecodeSettings(
            local_prefill_tokens=config.decode.local_prefill_tokens,
            prefill_timeout_s=config.decode.prefill_timeout_s,
            kv_transfer_timeout_s=config.decode.kv_transfer_timeout_s,
        )
        replica_id = serve.get_replica_context().replica_id.unique_id  # names the replica in responses and stats
        metrics = serve_replica_metrics("decode", served_model_name(config), config.decode.precision)
        self.worker = DecodeWorker(functools.partial(build_decode_parts, config), prefill, settings, replica_id, metrics)
        self.metrics_reporter = start_serve_reporting(metrics, self.worker.load)  # to the dashboard's collector

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        async for chunk in self.worker.generate(request):
            yield chunk

    def record_autoscaling_stats(self) -> dict[str, float]:
        return self.worker.load()

    def record_routing_stats(self) -> dict[str, float]:
        return self.worker.load()

    def load(self) -> dict[str, float]:
        return self.worker.load()

    def replica_stats(self, route: SessionRoute | None = None) -> dict[str, Any]:
        """This replica's Serve id and load; with `route`, Serve sends the call to that session's replica."""
        return {"replica": self.worker.replica_name, **self.worker.load()}

    def arm_transfer_fault(self, route: SessionRoute, plan: FaultPlan) -> str:
        """Test deployments (decode.transfer_fault_injection): arm `plan` in the transport of the replica
        serving `route.session_id`. Returns that replica's id (the `decode_replica` of its responses)."""
        return self.worker.arm_transfer_fault(plan)
