"""The cluster-wide view: every replica pushes its samples to one collector actor per application.

    Router replica ─┐  every REPORT_INTERVAL_S, from a daemon thread of the replica:
    Decode replica ─┼─ ReplicaReport (new samples + load) ──▶ [MetricsCollector actor]
    Prefill replica ┘                                          named "mixquant-metrics-<app>",
                                                               namespace "mixquant", detached
    GET /dashboard/api/metrics (any Router replica) ──snapshot()──▶ the same actor

Why push to a named actor rather than have the Router fan out to the replicas: a Serve handle
call reaches one replica of a pool, chosen by the request router, so "ask every replica" would
need Serve's private replica actors; and a replica that has just been scaled down can no longer
be asked about the requests it served. Pushing needs only the actor's name, works from any node,
keeps the samples of replicas that are gone, and makes "replicas per pool over time" the count
of replicas that reported recently, so autoscaling shows on the dashboard as it happens. The
actor is created by whichever replica comes first (`get_if_exists`), costs no CPU reservation,
and is detached so that a Router restart does not lose the history; it is restarted if it dies
(losing only the history). A replica that cannot reach it keeps its samples (bounded) and
retries on its next report.

`MetricsCollector` itself is plain Python (tested without Ray); `get_collector`,
`serve_replica_metrics` and `ReplicaReporter` are the Ray glue used inside Serve replicas.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from mixquant_serve.dashboard.aggregate import ReplicaState, aggregate, choose_window
from mixquant_serve.metrics import (
    MAX_BUFFERED_SAMPLES,
    POOLS,
    MetricsSink,
    Pool,
    RayMetricsSink,
    ReplicaMetrics,
    ReplicaReport,
)

logger = logging.getLogger(__name__)

COLLECTOR_NAMESPACE = "mixquant"
REPORT_INTERVAL_S = 1.0  # how often each replica pushes its samples and load
STALE_AFTER_S = 5.0  # a replica without a report for this long no longer counts as running
RETENTION_S = 1800.0  # the collector keeps samples this long
MAX_SAMPLES_PER_REPLICA = 50_000  # per kind (router, decode, prefill) and replica
PUSH_TIMEOUT_S = 10.0
DEFAULT_WINDOW_S = 300.0


def collector_name(app_name: str) -> str:
    return f"mixquant-metrics-{app_name}"


@dataclass
class _ReplicaHistory:
    pool: Pool
    replica: str
    node: str
    first_seen: float
    last_seen: float
    load: dict[str, float]
    report_times: deque = field(default_factory=deque)
    router: deque = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES_PER_REPLICA))
    decode: deque = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES_PER_REPLICA))
    prefill: deque = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES_PER_REPLICA))
    dropped_samples: int = 0

    def prune(self, oldest: float) -> None:
        while self.report_times and self.report_times[0] < oldest:
            self.report_times.popleft()
        for samples in (self.router, self.decode, self.prefill):
            while samples and samples[0].finished_at < oldest:
                samples.popleft()

    def state(self) -> ReplicaState:
        return ReplicaState(
            pool=self.pool,
            replica=self.replica,
            node=self.node,
            first_seen=self.first_seen,
            last_seen=self.last_seen,
            load=dict(self.load),
            report_times=tuple(self.report_times),
            router=tuple(self.router),
            decode=tuple(self.decode),
            prefill=tuple(self.prefill),
            dropped_samples=self.dropped_samples,
        )


class MetricsCollector:
    """Every replica's reports of one application; answers the dashboard's queries."""

    def __init__(self, sink_factory: Callable[[], MetricsSink] | None = None):
        """`sink_factory` (e.g. RayMetricsSink) exports `mixquant_pool_replicas`; None keeps it local."""
        self.model = ""  # the `model` label of the pool gauges: from the latest report
        self.sink = sink_factory() if sink_factory is not None else None
        self._replicas: dict[tuple[str, str], _ReplicaHistory] = {}

    def push(self, report: ReplicaReport) -> None:
        now = time.time()
        self.model = report.model
        key = (report.pool, report.replica)
        history = self._replicas.get(key)
        if history is None:
            history = _ReplicaHistory(report.pool, report.replica, report.node, now, now, {})
            self._replicas[key] = history
        history.last_seen, history.load = now, dict(report.load)
        history.report_times.append(now)
        history.router.extend(report.router)
        history.decode.extend(report.decode)
        history.prefill.extend(report.prefill)
        history.dropped_samples += report.dropped_samples
        self._prune(now)
        self._export_pool_sizes(now)

    def snapshot(self, window_s: float = DEFAULT_WINDOW_S, since: float | None = None) -> dict[str, Any]:
        """The dashboard JSON of the last `window_s` seconds (from `since`, a Unix time, if later)."""
        if not 0 < window_s <= RETENTION_S:
            raise ValueError(f"window_s: must lie in (0, {RETENTION_S}], got {window_s}")
        now = time.time()
        window = choose_window(now, window_s, since)
        states = [history.state() for history in self._replicas.values()]
        result = aggregate(window, states, STALE_AFTER_S)
        result["pools"] = {pool: self.pool_size(pool, now) for pool in POOLS}
        result["stale_after_s"] = STALE_AFTER_S
        return result

    def pool_size(self, pool: str, now: float) -> int:
        return sum(h.pool == pool and now - h.last_seen <= STALE_AFTER_S for h in self._replicas.values())

    def _prune(self, now: float) -> None:
        oldest = now - RETENTION_S
        for key in [k for k, h in self._replicas.items() if h.last_seen < oldest]:
            del self._replicas[key]
        for history in self._replicas.values():
            history.prune(oldest)

    def _export_pool_sizes(self, now: float) -> None:
        if self.sink is None:
            return
        for pool in POOLS:
            self.sink.record("mixquant_pool_replicas", float(self.pool_size(pool, now)), {"model": self.model, "pool": pool})


# ---------------------------------------------------------------------------------------------- Ray glue


def get_collector(app_name: str) -> Any:
    """The application's collector actor handle, created on first use (any replica may be first)."""
    import ray

    actor = ray.remote(MetricsCollector).options(
        name=collector_name(app_name),
        namespace=COLLECTOR_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_restarts=-1,
    )
    return actor.remote(RayMetricsSink)


def serve_replica_metrics(pool: Pool, model: str, precision: str) -> ReplicaMetrics:
    """Inside a Serve replica: a recorder labelled with this replica's id and node, exporting to Prometheus."""
    import ray
    from ray import serve

    context = serve.get_replica_context()
    node = ray.get_runtime_context().get_node_id()
    return ReplicaMetrics(pool, context.replica_id.unique_id, model, precision, RayMetricsSink(), node=node[:12])


def current_app_name() -> str:
    from ray import serve

    return serve.get_replica_context().app_name


class CollectorClient:
    """Pushes reports to the application's collector actor; looks it up again after a failure."""

    def __init__(self, app_name: str):
        self.app_name = app_name
        self._handle: Any = None

    def push(self, report: ReplicaReport) -> None:
        import ray

        if self._handle is None:
            self._handle = get_collector(self.app_name)
        try:
            ray.get(self._handle.push.remote(report), timeout=PUSH_TIMEOUT_S)
        except Exception:
            self._handle = None
            raise


class ReplicaReporter:
    """A daemon thread that, every `interval_s`, sets the load gauges and pushes a report (`push`)."""

    def __init__(self, metrics: ReplicaMetrics, load: Callable[[], dict[str, float]],
                 push: Callable[[ReplicaReport], None], interval_s: float = REPORT_INTERVAL_S):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.metrics, self.load, self.push, self.interval_s = metrics, load, push, interval_s
        self._unsent: ReplicaReport | None = None  # kept after a failed push, merged into the next one
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"mixquant-metrics-{metrics.pool}", daemon=True)

    def start(self) -> "ReplicaReporter":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def report_once(self) -> bool:
        """One report; False (samples kept for the next one) when the push failed."""
        load = self.load()
        self.metrics.set_load(load)
        report = self._merge_unsent(self.metrics.take_report(load))
        try:
            self.push(report)
        except Exception as error:  # collector restarting or unreachable: keep the samples
            logger.warning("metrics report to the collector failed (%r); retrying next interval", error)
            self._unsent = report
            return False
        return True

    def _merge_unsent(self, report: ReplicaReport) -> ReplicaReport:
        if self._unsent is None:
            return report
        old, self._unsent = self._unsent, None
        report.router[:0], report.decode[:0], report.prefill[:0] = old.router, old.decode, old.prefill
        overflow = len(report.router) + len(report.decode) + len(report.prefill) - MAX_BUFFERED_SAMPLES
        if overflow > 0:
            report.dropped_samples += overflow
            for samples in (report.router, report.decode, report.prefill):
                cut = min(overflow, len(samples))
                del samples[:cut]
                overflow -= cut
        report.dropped_samples += old.dropped_samples
        return report

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.report_once()
            except Exception:  # a failing load() must not end reporting for the replica's life
                logger.exception("metrics reporting failed")


def start_serve_reporting(metrics: ReplicaMetrics, load: Callable[[], dict[str, float]]) -> ReplicaReporter:
    """Inside a Serve replica: report to this application's collector from now on."""
    return ReplicaReporter(metrics, load, CollectorClient(current_app_name()).push).start()
