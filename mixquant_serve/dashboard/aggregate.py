"""The dashboard's numbers: every replica's samples of a time window, as the JSON the page draws.

Pure functions over the collector's windows (no Ray). Time is cut into buckets of `bucket_s`
seconds ending now; each series has one value per bucket, or None where the bucket has no data
(the page leaves a gap). `summary` covers the whole window; the load generator's percentiles are
comparable to `summary.ttft_s` etc. when the window holds exactly its requests (`since`).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

from mixquant_serve.metrics import POOLS, DecodeSample, PrefillSample, RouterSample, percentiles

T = TypeVar("T")
QUANTILES = (50, 90, 99)
MAX_BUCKETS = 60  # points per chart: 5 s buckets over 5 minutes, 30 s over 30


@dataclass(frozen=True)
class ReplicaState:
    """The collector's record of one replica."""

    pool: str
    replica: str
    node: str
    first_seen: float
    last_seen: float
    load: dict[str, float]
    report_times: tuple[float, ...]  # when its reports arrived (within the retention), ascending
    router: tuple[RouterSample, ...] = ()  # its samples within the retention
    decode: tuple[DecodeSample, ...] = ()
    prefill: tuple[PrefillSample, ...] = ()
    dropped_samples: int = 0  # overflowed its buffer while the collector was unreachable


@dataclass(frozen=True)
class Window:
    start: float
    end: float
    bucket_s: float

    def __post_init__(self) -> None:
        if not self.end > self.start:
            raise ValueError(f"end ({self.end}) must be after start ({self.start})")
        if self.bucket_s <= 0:
            raise ValueError(f"bucket_s must be > 0, got {self.bucket_s}")

    @property
    def num_buckets(self) -> int:
        return max(1, math.ceil((self.end - self.start) / self.bucket_s))

    def bucket_starts(self) -> list[float]:
        return [self.start + i * self.bucket_s for i in range(self.num_buckets)]

    def index(self, t: float) -> int | None:
        if not self.start <= t <= self.end:
            return None
        return min(int((t - self.start) // self.bucket_s), self.num_buckets - 1)


def choose_window(now: float, window_s: float, since: float | None) -> Window:
    """The last `window_s` seconds (from `since` if later), in at most MAX_BUCKETS buckets of >= 1 s."""
    if window_s <= 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    start = max(now - window_s, since) if since is not None else now - window_s
    if start >= now:
        raise ValueError(f"since ({since}) must be before now ({now})")
    span = now - start
    bucket_s = max(1.0, math.ceil(span / MAX_BUCKETS))
    if span / bucket_s < 20:  # short windows: finer buckets so the charts have a shape
        bucket_s = max(1.0, math.floor(span / 20)) if span >= 20 else span / 20
    return Window(start, now, bucket_s)


def bucketed(window: Window, samples: Sequence[T], time_of: Callable[[T], float]) -> list[list[T]]:
    buckets: list[list[T]] = [[] for _ in range(window.num_buckets)]
    for sample in samples:
        i = window.index(time_of(sample))
        if i is not None:
            buckets[i].append(sample)
    return buckets


def quantile_series(buckets: list[list[float]]) -> dict[str, list[float | None]]:
    per_bucket = [percentiles(values, QUANTILES) for values in buckets]
    return {f"p{q}": [p[f"p{q}"] for p in per_bucket] for q in QUANTILES}


def mean_or_none(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def ratio_or_none(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def in_window(window: Window, samples: Sequence[T], time_of: Callable[[T], float]) -> list[T]:
    return [s for s in samples if window.start <= time_of(s) <= window.end]


def aggregate(window: Window, replicas: Sequence[ReplicaState], stale_after_s: float) -> dict[str, Any]:
    """The JSON of GET /dashboard/api/metrics over every replica of every pool (see the module docstring)."""
    router = in_window(window, [s for r in replicas for s in r.router], lambda s: s.finished_at)
    decode = in_window(window, [s for r in replicas for s in r.decode], lambda s: s.finished_at)
    prefill = in_window(window, [s for r in replicas for s in r.prefill], lambda s: s.finished_at)
    router_b = bucketed(window, router, lambda s: s.finished_at)
    decode_b = bucketed(window, decode, lambda s: s.finished_at)
    prefill_b = bucketed(window, prefill, lambda s: s.finished_at)
    ok = [s for s in router if s.status == "ok"]
    span = window.end - window.start

    def rate(bucket_values: list[float]) -> list[float | None]:
        return [v / window.bucket_s for v in bucket_values]

    remote = [s for s in decode if s.prefill == "remote" and s.kv_transfer_bytes > 0]
    series = {
        "t": window.bucket_starts(),
        "ttft_s": quantile_series([[s.ttft_s for s in b if s.status == "ok" and s.ttft_s is not None] for b in router_b]),
        "itl_s": quantile_series([[g for s in b if s.status == "ok" for g in s.itl_s] for b in router_b]),
        "e2e_s": quantile_series([[s.e2e_s for s in b if s.status == "ok"] for b in router_b]),
        "ttft_breakdown_s": {
            "queue": [mean_or_none([s.queue_wait_s + s.prefill_queue_s for s in b]) for b in decode_b],
            "prefill": [mean_or_none([s.prefill_s for s in b]) for b in decode_b],
            "transfer": [mean_or_none([s.kv_transfer_s for s in b]) for b in decode_b],
            "first_decode_step": [mean_or_none([s.first_step_s for s in b]) for b in decode_b],
        },
        "throughput": {
            "requests_per_s": rate([float(sum(s.status == "ok" for s in b)) for b in router_b]),
            "prompt_tokens_per_s": rate([float(sum(s.prompt_tokens for s in b)) for b in router_b]),
            "generation_tokens_per_s": rate([float(sum(s.output_tokens for s in b)) for b in router_b]),
        },
        "kv_transfer_gb_per_s": [
            ratio_or_none(sum(s.kv_transfer_bytes for s in b if s.prefill == "remote") / 1e9,
                          sum(s.kv_transfer_s for s in b if s.prefill == "remote" and s.kv_transfer_bytes > 0))
            for b in decode_b
        ],
        "prefix_cache_hit_rate": {
            "decode": [ratio_or_none(sum(s.cached_tokens for s in b), sum(s.prompt_tokens for s in b)) for b in decode_b],
            "prefill": [ratio_or_none(sum(s.cached_tokens for s in b), sum(s.tokens for s in b)) for b in prefill_b],
        },
        "prefill_location": {
            "local": [float(sum(s.prefill == "local" and s.fallback_cause is None for s in b)) for b in decode_b],
            "remote": [float(sum(s.prefill == "remote" for s in b)) for b in decode_b],
            "fallback": [float(sum(s.fallback_cause is not None for s in b)) for b in decode_b],
        },
        "replicas": {pool: replica_counts(window, [r for r in replicas if r.pool == pool], stale_after_s) for pool in POOLS},
    }
    summary = {
        "requests": len(router),
        "ok": len(ok),
        "errors": sum(s.status == "error" for s in router),
        "cancelled": sum(s.status == "cancelled" for s in router),
        "ttft_s": percentiles([s.ttft_s for s in ok if s.ttft_s is not None], QUANTILES),
        "itl_s": percentiles([g for s in ok for g in s.itl_s], QUANTILES),
        "e2e_s": percentiles([s.e2e_s for s in ok], QUANTILES),
        "requests_per_s": len(ok) / span,
        "prompt_tokens_per_s": sum(s.prompt_tokens for s in router) / span,
        "generation_tokens_per_s": sum(s.output_tokens for s in router) / span,
        "kv_transfer_bytes": sum(s.kv_transfer_bytes for s in remote),
        "kv_transfer_gb_per_s": ratio_or_none(sum(s.kv_transfer_bytes for s in remote) / 1e9, sum(s.kv_transfer_s for s in remote)),
        "prefix_cache_hit_rate": {
            "decode": ratio_or_none(sum(s.cached_tokens for s in decode), sum(s.prompt_tokens for s in decode)),
            "prefill": ratio_or_none(sum(s.cached_tokens for s in prefill), sum(s.tokens for s in prefill)),
        },
        "prefills": {
            "local": sum(s.prefill == "local" and s.fallback_cause is None for s in decode),
            "remote": sum(s.prefill == "remote" for s in decode),
            "fallback": sum(s.fallback_cause is not None for s in decode),
        },
        "prefill_tokens_per_s": ratio_or_none(
            float(sum(s.tokens - s.cached_tokens for s in prefill)), sum(s.prefill_s for s in prefill)
        ),
    }
    return {
        "generated_at": window.end,
        "window": {"start": window.start, "end": window.end, "bucket_s": window.bucket_s},
        "summary": summary,
        "series": series,
        "replicas": replica_table(window, replicas, stale_after_s),
    }


def replica_counts(window: Window, replicas: Sequence[ReplicaState], stale_after_s: float) -> list[float]:
    """Per bucket: replicas of the pool with a report in the `stale_after_s` before the bucket's end."""
    counts = []
    for start in window.bucket_starts():
        end = min(start + window.bucket_s, window.end)
        alive = 0
        for r in replicas:  # report_times is ascending: the first report at or after end - stale_after_s
            i = bisect.bisect_left(r.report_times, end - stale_after_s)
            alive += i < len(r.report_times) and r.report_times[i] <= end
        counts.append(float(alive))
    return counts


def replica_table(window: Window, replicas: Sequence[ReplicaState], stale_after_s: float) -> list[dict[str, Any]]:
    """One row per replica that reported within the window: its load now and the requests it finished in the window."""
    rows = []
    for r in sorted(replicas, key=lambda r: (POOLS.index(r.pool), r.replica)):
        if r.last_seen < window.start:
            continue
        rows.append(
            {
                "pool": r.pool,
                "replica": r.replica,
                "node": r.node,
                "alive": window.end - r.last_seen <= stale_after_s,
                "last_seen_s_ago": max(0.0, window.end - r.last_seen),
                "requests": len(in_window(window, [*r.router, *r.decode, *r.prefill], lambda s: s.finished_at)),
                "dropped_samples": r.dropped_samples,
                "load": r.load,
            }
        )
    return rows
