"""Metrics: Prometheus naming, what each record call emits, router timing, and the cluster-wide aggregation.

No Ray and no model: a recording sink stands in for ray.util.metrics (the live export is checked in
tests/cpu/test_dashboard.py against a real scrape), and the collector is fed reports by hand.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from mixquant_serve.dashboard.aggregate import ReplicaState, Window, aggregate, choose_window
from mixquant_serve.dashboard.collector import STALE_AFTER_S, MetricsCollector, ReplicaReporter
from mixquant_serve.metrics import (
    METRICS,
    DecodeSample,
    InflightCounter,
    PrefillSample,
    ReplicaMetrics,
    ReplicaReport,
    RouterSample,
    check_record,
    exported_series_names,
    percentile,
    timed_generate,
)
from mixquant_serve.protocol import GenerateChunk, GenerateRequest, RequestStats
from mixquant_serve.engine.sampling import SamplingParams

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "mixquant.json"
UNIT_SUFFIXES = ("_seconds", "_bytes", "_ratio", "_tokens", "_sequences", "_requests", "_replicas", "_bytes_per_second", "_tokens_per_second")


class RecordingSink:
    def __init__(self):
        self.records: list[tuple[str, float, dict[str, str]]] = []

    def record(self, name, value, tags):
        self.records.append((name, value, dict(tags)))

    def values(self, name, **tags):
        return [v for n, v, t in self.records if n == name and all(t.get(k) == x for k, x in tags.items())]


# ---------------------------------------------------------------------------------------------- naming


def test_metric_names_follow_prometheus_conventions():
    names = [spec.name for spec in METRICS]
    assert len(names) == len(set(names))
    for spec in METRICS:
        assert re.fullmatch(r"mixquant_[a-z0-9_]+", spec.name), spec.name
        if spec.kind == "counter":
            assert spec.name.endswith("_total"), spec.name
        else:
            assert not spec.name.endswith("_total") and spec.name.endswith(UNIT_SUFFIXES), spec.name
        if "latency" in spec.name or spec.name.endswith("_seconds"):
            assert spec.name.endswith("_seconds")
        if spec.kind == "histogram":
            assert list(spec.buckets) == sorted(set(spec.buckets)) and spec.buckets, spec.name
        assert "pool" in spec.labels and "model" in spec.labels
        assert set(spec.labels) <= {"model", "pool", "replica", "precision", "status", "location", "cause"}


def test_record_checks_name_labels_and_value():
    check_record("mixquant_ttft_seconds", 0.1, {"model": "m", "pool": "router", "replica": "r"})
    with pytest.raises(ValueError, match="name"):
        check_record("mixquant_nope_seconds", 0.1, {})
    with pytest.raises(ValueError, match="tags"):
        check_record("mixquant_ttft_seconds", 0.1, {"model": "m", "pool": "router"})
    with pytest.raises(ValueError, match="value"):
        check_record("mixquant_ttft_seconds", -1.0, {"model": "m", "pool": "router", "replica": "r"})
    with pytest.raises(ValueError, match="pool"):
        ReplicaMetrics("gpu", "r", "m", "bf16")


def test_grafana_dashboard_uses_only_defined_metrics():
    """Every `ray_mixquant_*` name in the Grafana JSON is one the app defines (the live scrape is in test_dashboard)."""
    text = GRAFANA.read_text()
    dashboard = json.loads(text)
    assert dashboard["panels"] and dashboard["title"]
    used = set(re.findall(r"ray_mixquant_[a-z0-9_]+", text))
    defined = {name for spec in METRICS for name in exported_series_names(spec)}
    assert used and used <= defined, used - defined
    assert {"ray_mixquant_ttft_seconds_bucket", "ray_mixquant_pool_replicas", "ray_mixquant_kv_transfer_bytes_total"} <= used


# ---------------------------------------------------------------------------------------------- recording


def test_remote_request_emits_breakdown_transfer_and_cache_metrics():
    sink = RecordingSink()
    metrics = ReplicaMetrics("decode", "d1", "smol", "bf16", sink, node="n1")
    stats = RequestStats("remote", "nvfp4", cached_tokens_prefill=32, cached_tokens_decode=16, kv_transfer_bytes=4_000_000,
                         kv_transfer_ms=2.0, queue_ms=5.0, prefill_ms=40.0, ttft_ms=60.0)
    sample = metrics.record_decode_request(stats, queue_wait_s=0.003, prompt_tokens=100, output_tokens=7)
    assert sample.first_step_s == pytest.approx(0.060 - 0.003 - 0.005 - 0.040 - 0.002)
    assert sink.values("mixquant_kv_transfer_bytes_total") == [4_000_000]
    assert sink.values("mixquant_kv_transfer_bandwidth_bytes_per_second") == [pytest.approx(2e9)]
    assert sink.values("mixquant_prefix_cache_hit_tokens_total") == [16]
    assert sink.values("mixquant_prefills_total", location="remote", precision="nvfp4") == [1]
    assert sink.values("mixquant_prefill_fallbacks_total") == []
    for name, _, tags in sink.records:
        check_record(name, 0.0, tags)  # every record carries exactly its metric's labels
        assert tags.get("replica", "d1") == "d1" and tags["pool"] == "decode"


def test_fallback_is_counted_by_cause_and_has_no_transfer():
    sink = RecordingSink()
    metrics = ReplicaMetrics("decode", "d1", "smol", "bf16", sink)
    stats = RequestStats("local", "bf16", cached_tokens_decode=0, ttft_ms=30.0, fallback_reason="kv transfer failed: TimeoutError()")
    metrics.record_decode_request(stats, 0.001, 50, 3)
    assert sink.values("mixquant_prefill_fallbacks_total", cause="kv_transfer_failed") == [1]
    assert sink.values("mixquant_prefills_total", location="local", precision="bf16") == [1]
    assert sink.values("mixquant_kv_transfer_seconds") == []


def test_prefill_records_speed_of_uncached_tokens_and_rejects_bad_counts():
    sink = RecordingSink()
    metrics = ReplicaMetrics("prefill", "p1", "smol", "nvfp4", sink)
    metrics.record_prefill(tokens=300, cached_tokens=100, prefill_s=0.5, queue_s=0.1)
    assert sink.values("mixquant_prefill_speed_tokens_per_second", precision="nvfp4") == [400.0]
    assert sink.values("mixquant_prefill_tokens_total") == [200]
    assert sink.values("mixquant_queue_wait_seconds", pool="prefill") == [0.1]
    with pytest.raises(ValueError, match="cached_tokens"):
        metrics.record_prefill(tokens=10, cached_tokens=11, prefill_s=0.1, queue_s=0.0)


def test_load_sets_gauges_and_reports_drain_the_buffer():
    sink = RecordingSink()
    metrics = ReplicaMetrics("decode", "d1", "smol", "bf16", sink, node="n1")
    metrics.set_load({"running_seqs": 3.0, "kv_block_usage": 0.25, "requests": 9.0})
    assert sink.values("mixquant_running_sequences") == [3.0] and sink.values("mixquant_kv_cache_usage_ratio") == [0.25]
    metrics.record_decode_request(RequestStats("local", "bf16", ttft_ms=10.0), 0.0, 10, 2)
    report = metrics.take_report({"running_seqs": 3.0})
    assert (report.pool, report.replica, report.node, report.model) == ("decode", "d1", "n1", "smol")
    assert len(report.decode) == 1 and report.load == {"running_seqs": 3.0} and report.dropped_samples == 0
    assert metrics.take_report({}).decode == []


def request(n: int = 4) -> GenerateRequest:
    return GenerateRequest("cmpl-1", "s", list(range(n)), SamplingParams(max_tokens=8))


async def fake_stream(chunks, gaps):
    for chunk, gap in zip(chunks, gaps):
        await asyncio.sleep(gap)
        yield chunk


def test_timed_generate_measures_ttft_per_token_gaps_and_status():
    metrics, inflight = ReplicaMetrics("router", "r1", "smol", ""), InflightCounter()
    chunks = [
        GenerateChunk("cmpl-1", "a", [1], num_output_tokens=1),
        GenerateChunk("cmpl-1", "bc", [2, 3], num_output_tokens=3),
        GenerateChunk("cmpl-1", "d", [4], finished=True, finish_reason="stop", num_output_tokens=4),
    ]
    timed = timed_generate(lambda r: fake_stream(chunks, [0.02, 0.04, 0.01]), metrics, inflight)

    async def consume():
        return [c async for c in timed(request())]

    assert len(asyncio.run(consume())) == 3 and inflight.value == 0
    (sample,) = metrics.take_report({}).router
    assert sample.status == "ok" and sample.output_tokens == 4 and sample.prompt_tokens == 4
    assert len(sample.itl_s) == 3  # the 2-token chunk counts as two gaps of half its interval
    assert sample.itl_s[0] == sample.itl_s[1]
    assert sample.ttft_s < sample.ttft_s + sum(sample.itl_s) <= sample.e2e_s


def test_timed_generate_counts_failures_and_early_close():
    metrics, inflight = ReplicaMetrics("router", "r1", "smol", ""), InflightCounter()
    failing = [GenerateChunk("cmpl-1", "", [], finished=True, finish_reason="error", error="boom")]
    long = [GenerateChunk("cmpl-1", "x", [i], num_output_tokens=i + 1) for i in range(5)]

    async def run():
        async for _ in timed_generate(lambda r: fake_stream(failing, [0.0]), metrics, inflight)(request()):
            pass
        stream = timed_generate(lambda r: fake_stream(long, [0.0] * 5), metrics, inflight)(request())
        await stream.__anext__()
        await stream.aclose()  # the client went away after one token

    asyncio.run(run())
    statuses = [s.status for s in metrics.take_report({}).router]
    assert statuses == ["error", "cancelled"] and inflight.value == 0


# ---------------------------------------------------------------------------------------------- aggregation


def router_sample(t, ttft, e2e, itl=(0.01, 0.02), status="ok"):
    return RouterSample(t, ttft, tuple(itl), e2e, 100, len(itl) + 1, status)


def decode_sample(t, prefill="remote", cached=10, transfer_bytes=2_000_000, transfer_s=0.001, fallback=None):
    return DecodeSample(t, prefill, "nvfp4", 0.001, 0.002, 0.05, transfer_s if prefill == "remote" else 0.0,
                        transfer_bytes if prefill == "remote" else 0, 0.01, 0.07, 100, cached, 3, fallback)


def report(pool, replica, node, router=(), decode=(), prefill=(), load=None):
    return ReplicaReport(pool, replica, node, "smol", time.time(), load or {}, list(router), list(decode), list(prefill))


def test_collector_aggregates_every_replica_of_every_pool_across_nodes():
    collector = MetricsCollector()
    now = time.time()
    rng = np.random.default_rng(0)
    ttfts = {"r1": rng.uniform(0.05, 0.5, 40), "r2": rng.uniform(0.05, 0.5, 25)}
    for replica, node in (("r1", "node-a"), ("r2", "node-b")):
        collector.push(report("router", replica, node, router=[router_sample(now - 30 + i * 0.5, float(v), float(v) + 0.3) for i, v in enumerate(ttfts[replica])]))
    collector.push(report("decode", "d1", "node-a", decode=[decode_sample(now - 20 + i) for i in range(10)], load={"running_seqs": 2.0, "kv_block_usage": 0.5}))
    collector.push(report("decode", "d2", "node-b", decode=[decode_sample(now - 20 + i, prefill="local", cached=90) for i in range(6)]))
    collector.push(report("prefill", "p1", "node-b", prefill=[PrefillSample(now - 10, 100, 25, 0.05, 0.01)] * 4, load={"queued_prefill_tokens": 512.0}))

    data = json.loads(json.dumps(collector.snapshot(window_s=120)))  # the API's JSON round trip
    rows = {(r["pool"], r["replica"]): r for r in data["replicas"]}
    assert {k: r["requests"] for k, r in rows.items()} == {
        ("router", "r1"): 40, ("router", "r2"): 25, ("decode", "d1"): 10, ("decode", "d2"): 6, ("prefill", "p1"): 4}
    assert rows[("decode", "d1")]["node"] == "node-a" and rows[("prefill", "p1")]["load"] == {"queued_prefill_tokens": 512.0}
    assert all(r["alive"] for r in rows.values())
    assert data["pools"] == {"router": 2, "decode": 2, "prefill": 1}

    summary = data["summary"]
    every_ttft = np.concatenate([ttfts["r1"], ttfts["r2"]])
    for q in (50, 90, 99):
        assert summary["ttft_s"][f"p{q}"] == pytest.approx(np.percentile(every_ttft, q))
    assert summary["requests"] == 65 and summary["prefills"] == {"local": 6, "remote": 10, "fallback": 0}
    assert summary["kv_transfer_gb_per_s"] == pytest.approx(2.0)
    assert summary["prefix_cache_hit_rate"]["decode"] == pytest.approx((10 * 10 + 6 * 90) / (16 * 100))
    assert summary["prefix_cache_hit_rate"]["prefill"] == pytest.approx(0.25)
    series = data["series"]
    n = len(series["t"])
    for values in (series["ttft_s"]["p99"], series["kv_transfer_gb_per_s"], series["replicas"]["decode"]):
        assert len(values) == n
    assert 8 <= sum(v is not None for v in series["ttft_s"]["p50"]) < n  # spread over buckets, gaps elsewhere
    assert series["replicas"]["router"][-1] == 2.0 and series["replicas"]["router"][0] == 0.0  # reported only now
    assert sum(series["prefill_location"]["remote"]) == 10


def test_replica_counts_follow_reports_so_autoscaling_shows():
    start = 1000.0
    window = Window(start, start + 60, 5.0)
    steady = ReplicaState("prefill", "p1", "n", start, start + 60, {}, tuple(start + t for t in range(0, 61)))
    added = ReplicaState("prefill", "p2", "n", start + 20, start + 40, {}, tuple(start + t for t in range(20, 41)))
    data = aggregate(window, [steady, added], stale_after_s=STALE_AFTER_S)
    counts = data["series"]["replicas"]["prefill"]
    # a bucket counts the replicas that reported within STALE_AFTER_S (5 s) before its end
    assert counts == [1.0] * 3 + [2.0] * 6 + [1.0] * 3
    rows = {r["replica"]: r for r in data["replicas"]}
    assert rows["p1"]["alive"] and not rows["p2"]["alive"] and rows["p2"]["last_seen_s_ago"] == 20.0


def test_empty_window_has_null_series_and_no_rows():
    data = MetricsCollector().snapshot(window_s=60)
    assert data["summary"]["requests"] == 0 and data["summary"]["ttft_s"] == {"p50": None, "p90": None, "p99": None}
    assert all(v is None for v in data["series"]["ttft_s"]["p50"]) and data["replicas"] == []
    assert data["series"]["replicas"]["decode"] == [0.0] * len(data["series"]["t"])


def test_window_validation_and_since():
    with pytest.raises(ValueError, match="window_s"):
        MetricsCollector().snapshot(window_s=0)
    with pytest.raises(ValueError, match="since"):
        choose_window(100.0, 60.0, since=200.0)
    window = choose_window(100.0, 60.0, since=90.0)
    assert window.start == 90.0 and window.num_buckets >= 10
    collector = MetricsCollector()
    now = time.time()
    collector.push(report("router", "r1", "n", router=[router_sample(now - 50, 0.1, 0.2), router_sample(now - 5, 0.3, 0.4)]))
    assert collector.snapshot(60.0, since=now - 10)["summary"]["requests"] == 1


def test_percentile_matches_numpy():
    rng = np.random.default_rng(1)
    for size in (1, 2, 7, 100):
        values = rng.exponential(size=size).tolist()
        for q in (0, 50, 90, 99, 100):
            assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert percentile([], 50) is None


def test_reporter_keeps_samples_when_the_collector_is_unreachable():
    metrics = ReplicaMetrics("prefill", "p1", "smol", "nvfp4")
    collector = MetricsCollector()
    pushes = []

    def push(item: ReplicaReport) -> None:
        pushes.append(item)
        if len(pushes) == 1:
            raise ConnectionError("collector restarting")
        collector.push(item)

    reporter = ReplicaReporter(metrics, lambda: {"queued_prefill_tokens": 7.0}, push, interval_s=60)
    metrics.record_prefill(10, 0, 0.1, 0.0)
    assert reporter.report_once() is False
    metrics.record_prefill(20, 0, 0.1, 0.0)
    assert reporter.report_once() is True
    assert [s.tokens for s in pushes[-1].prefill] == [10, 20] and pushes[-1].dropped_samples == 0
    (row,) = collector.snapshot(60)["replicas"]
    assert row["requests"] == 2 and row["load"] == {"queued_prefill_tokens": 7.0}
