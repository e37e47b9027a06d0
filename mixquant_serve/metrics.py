"""Every metric of mixquant-serve in one place: Prometheus export through Ray, and the dashboard's samples.

    Router replica ──timed_generate──▶ RouterSample (TTFT, inter-token gaps, E2E, tokens, status)
    DecodeWorker   ──record_decode───▶ DecodeSample (queue, prefill, KV transfer, first step, cache hits)
    PrefillWorker  ──record_prefill──▶ PrefillSample (queue, prefill time, tokens, cache hits)
    each replica, every second: load() ──set_load──▶ gauges (running seqs, KV use, queued tokens)
        │ ReplicaMetrics: every observation goes to a MetricsSink (Prometheus, via ray.util.metrics)
        │ and into the replica's buffer, drained by `take_report()` into a ReplicaReport
        ▼
    dashboard/collector.py pushes the reports to the app's collector actor (cluster-wide view)

`METRICS` lists every exported metric: name, kind, unit suffix and labels, following Prometheus
conventions (seconds, bytes, `_total` on counters, `_ratio` for fractions). Ray prefixes every
name with `ray_` when it serves them (`ray_mixquant_ttft_seconds_bucket`); `EXPORT_PREFIX` says so.
The labels are `model`, `pool` (router | decode | prefill), `replica` (the Serve replica id) and
`precision` (the phase's matmul precision) where it applies, plus a few metric-specific ones.

This module imports no Ray: `RayMetricsSink` imports `ray.util.metrics` when it is constructed, so
workers and unit tests use the rest without a cluster.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncGenerator, Callable, Literal, Protocol, Sequence

from mixquant_serve.protocol import GenerateChunk, GenerateRequest, RequestStats

MetricKind = Literal["histogram", "counter", "gauge"]
Pool = Literal["router", "decode", "prefill"]
POOLS: tuple[Pool, ...] = ("router", "decode", "prefill")
EXPORT_PREFIX = "ray_"  # what Ray's Prometheus endpoint puts before every ray.util.metrics name

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
BYTES_BUCKETS = tuple(float(2**p) for p in range(16, 36, 2))  # 64 KiB .. 16 GiB
BANDWIDTH_BUCKETS = tuple(float(10**p) for p in range(6, 12)) + (5e11,)  # 1 MB/s .. 500 GB/s
TOKENS_PER_S_BUCKETS = (100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5, 3e5, 1e6)
MAX_BUFFERED_SAMPLES = 20_000  # per replica between two reports; the oldest go first if the collector is away
MAX_ITL_SAMPLES_PER_REQUEST = 2048  # a request's inter-token gaps kept for the dashboard's percentiles

BASE_LABELS = ("model", "pool", "replica")
PHASE_LABELS = BASE_LABELS + ("precision",)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: MetricKind
    description: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()


METRICS: tuple[MetricSpec, ...] = (
    # ---- client-facing latency, measured by the Router around the decode pool's stream
    MetricSpec("mixquant_ttft_seconds", "histogram", "Time to first token at the router (after tokenization).", BASE_LABELS, LATENCY_BUCKETS_S),
    MetricSpec("mixquant_inter_token_latency_seconds", "histogram", "Gap between consecutive output tokens at the router.", BASE_LABELS, ITL_BUCKETS_S),
    MetricSpec("mixquant_e2e_latency_seconds", "histogram", "Whole request at the router, first call to last token.", BASE_LABELS, LATENCY_BUCKETS_S),
    MetricSpec("mixquant_requests_total", "counter", "Requests finished at the router, by status (ok | error | cancelled).", BASE_LABELS + ("status",)),
    MetricSpec("mixquant_prompt_tokens_total", "counter", "Prompt tokens of finished requests.", BASE_LABELS),
    MetricSpec("mixquant_generation_tokens_total", "counter", "Output tokens of finished requests.", BASE_LABELS),
    # ---- where the time to first token goes (decode and prefill pools)
    MetricSpec("mixquant_queue_wait_seconds", "histogram", "Wait before a pool's engine takes the request (prefill: engine queue; decode: engine thread).", PHASE_LABELS, LATENCY_BUCKETS_S),
    MetricSpec("mixquant_prefill_seconds", "histogram", "Prefill compute time of one request on the prefill pool.", PHASE_LABELS, LATENCY_BUCKETS_S),
    MetricSpec("mixquant_prefill_speed_tokens_per_second", "histogram", "Prefilled (uncached) tokens per second of one request.", PHASE_LABELS, TOKENS_PER_S_BUCKETS),
    MetricSpec("mixquant_prefill_tokens_total", "counter", "Prompt tokens computed by prefill (cache misses).", PHASE_LABELS),
    MetricSpec("mixquant_first_decode_step_seconds", "histogram", "Decode-side TTFT minus queue, remote prefill and KV transfer: local prefill and the first BF16 step.", PHASE_LABELS, LATENCY_BUCKETS_S),
    MetricSpec("mixquant_kv_transfer_seconds", "histogram", "Duration of one KV pull from a prefill replica.", PHASE_LABELS, LATENCY_BUCKETS_S),
    MetricSpec("mixquant_kv_transfer_bytes", "histogram", "Bytes of one KV pull.", PHASE_LABELS, BYTES_BUCKETS),
    MetricSpec("mixquant_kv_transfer_bandwidth_bytes_per_second", "histogram", "Bytes per second of one KV pull.", PHASE_LABELS, BANDWIDTH_BUCKETS),
    MetricSpec("mixquant_kv_transfer_bytes_total", "counter", "Bytes pulled over the KV transport.", PHASE_LABELS),
    MetricSpec("mixquant_prefix_cache_hit_tokens_total", "counter", "Prompt tokens found in the pool's prefix cache.", PHASE_LABELS),
    MetricSpec("mixquant_prefix_cache_query_tokens_total", "counter", "Prompt tokens looked up in the pool's prefix cache.", PHASE_LABELS),
    MetricSpec("mixquant_prefills_total", "counter", "Prefills by where they ran (local: decode replica; remote: prefill pool).", PHASE_LABELS + ("location",)),
    MetricSpec("mixquant_prefill_fallbacks_total", "counter", "Remote prefills that fell back to a local prefill, by cause.", PHASE_LABELS + ("cause",)),
    # ---- per-replica load (sampled every report interval)
    MetricSpec("mixquant_running_sequences", "gauge", "Sequences in the decode replica's running batch.", BASE_LABELS),
    MetricSpec("mixquant_waiting_sequences", "gauge", "Sequences waiting for the decode replica's batch.", BASE_LABELS),
    MetricSpec("mixquant_kv_cache_usage_ratio", "gauge", "Fraction of the replica's KV blocks in use.", BASE_LABELS),
    MetricSpec("mixquant_prefill_queued_tokens", "gauge", "Prompt tokens waiting for or in prefill on the replica.", BASE_LABELS),
    MetricSpec("mixquant_inflight_requests", "gauge", "Requests the router replica is serving.", BASE_LABELS),
    # ---- per pool (set by the collector)
    MetricSpec("mixquant_pool_replicas", "gauge", "Replicas of the pool that reported in the last few seconds.", ("model", "pool")),
)
METRICS_BY_NAME = {spec.name: spec for spec in METRICS}

# load() keys of the workers -> the gauge each one sets
LOAD_GAUGES = {
    "running_seqs": "mixquant_running_sequences",
    "waiting_seqs": "mixquant_waiting_sequences",
    "kv_block_usage": "mixquant_kv_cache_usage_ratio",
    "queued_prefill_tokens": "mixquant_prefill_queued_tokens",
    "inflight_requests": "mixquant_inflight_requests",
}
FALLBACK_CAUSES = (  # RequestStats.fallback_reason prefixes (workers/decode.py) -> `cause` label
    ("decode KV cache full", "kv_cache_full"),
    ("prefill failed", "prefill_failed"),
    ("kv transfer failed", "kv_transfer_failed"),
)


def fallback_cause(reason: str) -> str:
    for prefix, cause in FALLBACK_CAUSES:
        if reason.startswith(prefix):
            return cause
    return "other"


def exported_name(spec: MetricSpec) -> str:
    return EXPORT_PREFIX + spec.name


def exported_series_names(spec: MetricSpec) -> tuple[str, ...]:
    """The names a Prometheus scrape shows for `spec` (histograms: _bucket, _count, _sum)."""
    base = exported_name(spec)
    if spec.kind == "histogram":
        return (base + "_bucket", base + "_count", base + "_sum")
    return (base,)


# ---------------------------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class RouterSample:
    """One request as the router saw it; times in seconds, `finished_at` wall-clock (time.time())."""

    finished_at: float
    ttft_s: float | None  # None: no token arrived
    itl_s: tuple[float, ...]
    e2e_s: float
    prompt_tokens: int
    output_tokens: int
    status: str  # ok | error | cancelled


@dataclass(frozen=True)
class DecodeSample:
    finished_at: float
    prefill: str  # local | remote
    prefill_precision: str
    queue_wait_s: float  # decode side
    prefill_queue_s: float  # prefill pool's queue (remote only)
    prefill_s: float  # remote prefill compute
    kv_transfer_s: float
    kv_transfer_bytes: int
    first_step_s: float  # decode TTFT minus the parts above
    ttft_s: float  # decode side
    prompt_tokens: int
    cached_tokens: int  # decode replica's prefix-cache hits
    output_tokens: int
    fallback_cause: str | None


@dataclass(frozen=True)
class PrefillSample:
    finished_at: float
    tokens: int  # tokens of the request (prompt[:-1])
    cached_tokens: int  # prefill replica's prefix-cache hits
    prefill_s: float
    queue_s: float


@dataclass
class ReplicaReport:
    """What a replica sends its collector every report interval: new samples and its current load."""

    pool: Pool
    replica: str
    node: str
    model: str
    sent_at: float
    load: dict[str, float]
    router: list[RouterSample] = field(default_factory=list)
    decode: list[DecodeSample] = field(default_factory=list)
    prefill: list[PrefillSample] = field(default_factory=list)
    dropped_samples: int = 0


# ---------------------------------------------------------------------------------------------- sinks


class MetricsSink(Protocol):
    """Where observations go besides the dashboard buffer (Prometheus through Ray in a deployment)."""

    def record(self, name: str, value: float, tags: dict[str, str]) -> None: ...


class RayMetricsSink:
    """Every metric of `METRICS` as a ray.util.metrics object; built once per replica process."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self._metrics: dict[str, object] = {}
        for spec in METRICS:
            if spec.kind == "histogram":
                metric = Histogram(spec.name, description=spec.description, boundaries=list(spec.buckets), tag_keys=spec.labels)
            elif spec.kind == "counter":
                metric = Counter(spec.name, description=spec.description, tag_keys=spec.labels)
            else:
                metric = Gauge(spec.name, description=spec.description, tag_keys=spec.labels)
            self._metrics[spec.name] = metric

    def record(self, name: str, value: float, tags: dict[str, str]) -> None:
        metric = self._metrics[name]
        kind = METRICS_BY_NAME[name].kind
        if kind == "histogram":
            metric.observe(value, tags=tags)
        elif kind == "counter":
            if value > 0:
                metric.inc(value, tags=tags)
        else:
            metric.set(value, tags=tags)


def check_record(name: str, value: float, tags: dict[str, str]) -> None:
    """ValueError unless `name` is a known metric, `tags` are exactly its labels and `value` is finite."""
    spec = METRICS_BY_NAME.get(name)
    if spec is None:
        raise ValueError(f"name: {name!r} is not a metric of mixquant_serve.metrics.METRICS")
    if set(tags) != set(spec.labels):
        raise ValueError(f"tags: {name} takes labels {spec.labels}, got {tuple(sorted(tags))}")
    if not math.isfinite(value) or (spec.kind != "gauge" and value < 0):
        raise ValueError(f"value: {name} got {value}")


# ---------------------------------------------------------------------------------------------- per replica


class ReplicaMetrics:
    """A replica's recorder: each observation goes to the sink (if any) and into the report buffer.

    Thread-safe: the replica's event loop records while the reporting thread drains.
    """

    def __init__(self, pool: Pool, replica: str, model: str, precision: str, sink: MetricsSink | None = None, node: str = ""):
        if pool not in POOLS:
            raise ValueError(f"pool: must be one of {POOLS}, got {pool!r}")
        self.pool, self.replica, self.model, self.precision, self.node = pool, replica, model, precision, node
        self.sink = sink
        self._lock = threading.Lock()
        self._samples: deque = deque(maxlen=MAX_BUFFERED_SAMPLES)
        self._recorded = 0  # samples ever buffered; the difference to those reported is what overflowed
        self._reported = 0

    def _tags(self, labels: Sequence[str], **extra: str) -> dict[str, str]:
        values = {"model": self.model, "pool": self.pool, "replica": self.replica, "precision": self.precision, **extra}
        return {label: values[label] for label in labels}

    def _emit(self, name: str, value: float, **extra: str) -> None:
        if self.sink is None:
            return
        spec = METRICS_BY_NAME[name]
        tags = self._tags(spec.labels, **extra)
        check_record(name, value, tags)
        self.sink.record(name, value, tags)

    def _buffer(self, sample: RouterSample | DecodeSample | PrefillSample) -> None:
        with self._lock:
            self._samples.append(sample)
            self._recorded += 1

    # ---- router
    def record_router_request(self, sample: RouterSample) -> None:
        if sample.ttft_s is not None:
            self._emit("mixquant_ttft_seconds", sample.ttft_s)
        for gap in sample.itl_s:
            self._emit("mixquant_inter_token_latency_seconds", gap)
        self._emit("mixquant_e2e_latency_seconds", sample.e2e_s)
        self._emit("mixquant_requests_total", 1, status=sample.status)
        self._emit("mixquant_prompt_tokens_total", sample.prompt_tokens)
        self._emit("mixquant_generation_tokens_total", sample.output_tokens)
        self._buffer(sample)

    # ---- decode pool
    def record_decode_request(self, stats: RequestStats, queue_wait_s: float, prompt_tokens: int, output_tokens: int) -> DecodeSample:
        """A finished request's RequestStats (workers/decode.py) as metrics; returns the buffered sample."""
        remote = stats.prefill == "remote"
        prefill_queue_s, prefill_s, transfer_s = stats.queue_ms / 1e3, stats.prefill_ms / 1e3, stats.kv_transfer_ms / 1e3
        ttft_s = stats.ttft_ms / 1e3
        first_step_s = max(0.0, ttft_s - queue_wait_s - prefill_queue_s - prefill_s - transfer_s)
        cause = fallback_cause(stats.fallback_reason) if stats.fallback_reason else None
        sample = DecodeSample(
            finished_at=time.time(),
            prefill=stats.prefill,
            prefill_precision=stats.prefill_precision,
            queue_wait_s=queue_wait_s,
            prefill_queue_s=prefill_queue_s,
            prefill_s=prefill_s,
            kv_transfer_s=transfer_s,
            kv_transfer_bytes=stats.kv_transfer_bytes,
            first_step_s=first_step_s,
            ttft_s=ttft_s,
            prompt_tokens=prompt_tokens,
            cached_tokens=stats.cached_tokens_decode,
            output_tokens=output_tokens,
            fallback_cause=cause,
        )
        self._emit("mixquant_queue_wait_seconds", queue_wait_s)
        self._emit("mixquant_first_decode_step_seconds", first_step_s)
        self._emit("mixquant_prefix_cache_hit_tokens_total", stats.cached_tokens_decode)
        self._emit("mixquant_prefix_cache_query_tokens_total", prompt_tokens)
        location_precision = stats.prefill_precision if remote else self.precision
        if self.sink is not None:  # the prefill's own precision, not the decode replica's
            tags = {**self._tags(PHASE_LABELS), "precision": location_precision, "location": stats.prefill}
            check_record("mixquant_prefills_total", 1, tags)
            self.sink.record("mixquant_prefills_total", 1, tags)
        if cause is not None:
            self._emit("mixquant_prefill_fallbacks_total", 1, cause=cause)
        if remote and stats.kv_transfer_bytes > 0:
            self._emit("mixquant_kv_transfer_seconds", transfer_s)
            self._emit("mixquant_kv_transfer_bytes", stats.kv_transfer_bytes)
            self._emit("mixquant_kv_transfer_bytes_total", stats.kv_transfer_bytes)
            if transfer_s > 0:
                self._emit("mixquant_kv_transfer_bandwidth_bytes_per_second", stats.kv_transfer_bytes / transfer_s)
        self._buffer(sample)
        return sample

    # ---- prefill pool
    def record_prefill(self, tokens: int, cached_tokens: int, prefill_s: float, queue_s: float) -> PrefillSample:
        if not 0 <= cached_tokens <= tokens:
            raise ValueError(f"cached_tokens: must lie in [0, tokens={tokens}], got {cached_tokens}")
        sample = PrefillSample(time.time(), tokens, cached_tokens, prefill_s, queue_s)
        computed = tokens - cached_tokens
        self._emit("mixquant_queue_wait_seconds", queue_s)
        self._emit("mixquant_prefill_seconds", prefill_s)
        self._emit("mixquant_prefill_tokens_total", computed)
        if prefill_s > 0 and computed > 0:
            self._emit("mixquant_prefill_speed_tokens_per_second", computed / prefill_s)
        self._emit("mixquant_prefix_cache_hit_tokens_total", cached_tokens)
        self._emit("mixquant_prefix_cache_query_tokens_total", tokens)
        self._buffer(sample)
        return sample

    # ---- load and reports
    def set_load(self, load: dict[str, float]) -> None:
        """Sets the gauge of every known key of a worker's `load()`; other keys only travel in reports."""
        for key, name in LOAD_GAUGES.items():
            if key in load:
                self._emit(name, float(load[key]))

    def take_report(self, load: dict[str, float]) -> ReplicaReport:
        """Drains the samples recorded since the last report."""
        with self._lock:
            samples = list(self._samples)
            self._samples.clear()
            dropped = self._recorded - self._reported - len(samples)
            self._reported = self._recorded
        report = ReplicaReport(self.pool, self.replica, self.node, self.model, time.time(), dict(load), dropped_samples=dropped)
        for sample in samples:
            if isinstance(sample, RouterSample):
                report.router.append(sample)
            elif isinstance(sample, DecodeSample):
                report.decode.append(sample)
            else:
                report.prefill.append(sample)
        return report


# ---------------------------------------------------------------------------------------------- router timing

GenerateFn = Callable[[GenerateRequest], AsyncGenerator[GenerateChunk, None]]


class InflightCounter:
    """Requests a router replica is serving now (its `load()` for the dashboard)."""

    def __init__(self) -> None:
        self.value = 0

    def load(self) -> dict[str, float]:
        return {"inflight_requests": float(self.value)}


def timed_generate(generate: GenerateFn, metrics: ReplicaMetrics, inflight: InflightCounter) -> GenerateFn:
    """`generate`, timed: TTFT, the gap before every output token, E2E and status per request.

    A chunk of k tokens arriving `gap` seconds after the previous one counts as k gaps of gap/k.
    The request ends `ok` on its final chunk, `error` on a failed chunk or an exception, and
    `cancelled` when the caller closes the stream early (client gone).
    """

    async def timed(request: GenerateRequest) -> AsyncGenerator[GenerateChunk, None]:
        started = previous = time.perf_counter()
        ttft: float | None = None
        gaps: list[float] = []
        status, prompt_tokens, output_tokens = "cancelled", len(request.prompt_token_ids), 0
        inflight.value += 1
        try:
            async for chunk in generate(request):
                now = time.perf_counter()
                if chunk.finish_reason in ("error", "abort"):
                    status = "error"
                elif chunk.token_ids:
                    if ttft is None:
                        ttft = now - started
                    elif len(gaps) < MAX_ITL_SAMPLES_PER_REQUEST:
                        gaps.extend([(now - previous) / len(chunk.token_ids)] * len(chunk.token_ids))
                    previous = now
                output_tokens = max(output_tokens, chunk.num_output_tokens)
                if chunk.finished and status != "error":
                    status = "ok"
                yield chunk
        except Exception:
            status = "error"
            raise
        finally:
            inflight.value -= 1
            sample = RouterSample(
                finished_at=time.time(),
                ttft_s=ttft,
                itl_s=tuple(gaps[:MAX_ITL_SAMPLES_PER_REQUEST]),
                e2e_s=time.perf_counter() - started,
                prompt_tokens=prompt_tokens,
                output_tokens=output_tokens,
                status=status,
            )
            metrics.record_router_request(sample)

    return timed


# ---------------------------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation (numpy's default); None for no values."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q: must lie in [0, 100], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> dict[str, float | None]:
    return {f"p{q:g}": percentile(values, q) for q in qs}
