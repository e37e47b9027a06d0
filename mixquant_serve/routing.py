"""Session-affinity replica choice: consistent hashing with bounded loads, as a Ray Serve request router.

An agent session's turns share a growing prefix, so each pool's prefix cache pays off only when
the session keeps landing on the replica that already holds that prefix:

    Router ──handle──▶ DecodeWorker pool ──handle──▶ PrefillWorker pool
           [session ring]                 [session ring]

Both hops use `SessionAffinityRequestRouter`, configured on the *target* deployment; every handle
to that deployment (each Router replica, each DecodeWorker replica) builds the same ring, so they
all agree on a session's home replica without talking to each other.

The policy (`SessionAffinityPolicy`, pure Python) is "consistent hashing with bounded loads"
(Mirrokni, Thorup, Zadimoghaddam, 2018):

- every replica owns `virtual_nodes` points on a 64-bit ring (blake2b of "replica_id#i"); a
  session hashes to a point and its home is the owner of the first replica point at or after it.
  Adding or removing one of N replicas moves only ~1/N of the sessions.
- walking the ring from the session's point, the first replica whose queue length is below both
  `max_queue_len` (when set) and the load bound ceil(load_factor * mean_queue_len + 1) takes the
  request. The bound keeps one hot session (or an unlucky hash) from piling onto one replica:
  no replica ever holds more than ~load_factor times the mean, plus one. If no replica qualifies,
  the least-loaded one goes first.

Replica stats: each replica reports its KV-block use through Serve's routing-stats hook
(`record_routing_stats`, polled by Serve every `request_routing_stats_period_s`; the router reads
`RunningReplica.routing_stats`). A replica at or above `saturated_kv_usage` is saturated: its cache
cannot take a new session's prompt without evicting the prefixes other sessions will come back
for (or, when nothing is evictable, without waiting), so it never qualifies; it still takes the
request when every replica is saturated or over the bound.

`choose()` returns every replica in order of preference: the qualifying ones in ring-walk order,
then the rest by ascending queue length (saturated after unsaturated). The Ray router hands them to Serve one per rank, so Serve
sends the request to the first one that is not at `max_ongoing_requests`.

Requests that carry no session (first positional argument without a `session_id` string, e.g.
health or stats calls) get Serve's power-of-two-choices: two random replicas, the shorter queue wins.

Use (Ray Serve 2.60), on the DecodeWorker and PrefillWorker deployments:

    from ray.serve.config import RequestRouterConfig

    @serve.deployment(
        request_router_config=RequestRouterConfig(
            request_router_class="mixquant_serve.routing:SessionAffinityRequestRouter",
            request_router_kwargs={"virtual_nodes": 64, "max_queue_len": None, "load_factor": 1.25,
                                   "saturated_kv_usage": 0.95},
            request_routing_stats_period_s=1.0,
        ),
    )

or in a serve config YAML, under the deployment:

    request_router_config:
      request_router_class: mixquant_serve.routing:SessionAffinityRequestRouter
      request_router_kwargs: {virtual_nodes: 64, load_factor: 1.25}

Serve cloudpickles this module by value into every process that holds a handle, so it imports
only the standard library and Ray.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

KV_BLOCK_USAGE = "kv_block_usage"  # key of the replicas' routing stats read here
HASH_BYTES = 8  # 64-bit ring positions
LOAD_BOUND_EPS = 1e-9  # keeps float rounding (e.g. 1.25 * 0.8 + 1 = 2.0000000000000004) from raising the bound


def ring_hash(key: str) -> int:
    """Stable 64-bit position of `key` on the ring: the same in every process (unlike `hash()`)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=HASH_BYTES).digest(), "big")


@dataclass
class AffinityStats:
    """Routing decisions so far: `hits` went to the session's home replica, `fallbacks` elsewhere.

    Counts decisions, not placements: a request whose chosen replica rejects it (queue full at the
    replica) is decided again and counted again.
    """

    hits: int = 0
    fallbacks: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.fallbacks
        return self.hits / total if total else 0.0


class SessionAffinityPolicy:
    """Consistent hashing of session ids onto replicas, with bounded loads. No Ray inside."""

    def __init__(self, virtual_nodes: int = 64, max_queue_len: int | None = None, load_factor: float = 1.25) -> None:
        if not isinstance(virtual_nodes, int) or virtual_nodes < 1:
            raise ValueError(f"virtual_nodes must be a positive int, got {virtual_nodes!r}")
        if max_queue_len is not None and (not isinstance(max_queue_len, int) or max_queue_len < 1):
            raise ValueError(f"max_queue_len must be None or a positive int, got {max_queue_len!r}")
        if not load_factor >= 1.0:
            raise ValueError(f"load_factor must be >= 1.0, got {load_factor!r}")
        self.virtual_nodes = virtual_nodes
        self.max_queue_len = max_queue_len
        self.load_factor = float(load_factor)
        self.stats = AffinityStats()
        self._ring_members: frozenset[str] = frozenset()
        self._ring_points: list[int] = []  # sorted positions
        self._ring_owners: list[str] = []  # replica id owning each position

    def _set_replicas(self, replica_ids: Iterable[str]) -> None:
        members = frozenset(replica_ids)
        if not members:
            raise ValueError("replica_ids is empty: there is no replica to route to")
        if members == self._ring_members:
            return
        points = sorted(
            (ring_hash(f"replica:{replica_id}#{i}"), replica_id) for replica_id in members for i in range(self.virtual_nodes)
        )
        self._ring_members = members
        self._ring_points = [point for point, _ in points]
        self._ring_owners = [owner for _, owner in points]

    def preference_order(self, session_id: str, replica_ids: Iterable[str]) -> list[str]:
        """All replicas in the order met walking the ring clockwise from the session's point; [0] is its home."""
        if not isinstance(session_id, str) or not session_id:
            raise ValueError(f"session_id must be a non-empty str, got {session_id!r}")
        self._set_replicas(replica_ids)
        num_points = len(self._ring_points)
        start = bisect.bisect_left(self._ring_points, ring_hash(f"session:{session_id}"))
        order: list[str] = []
        seen: set[str] = set()
        for step in range(num_points):
            owner = self._ring_owners[(start + step) % num_points]
            if owner not in seen:
                seen.add(owner)
                order.append(owner)
                if len(order) == len(self._ring_members):
                    break
        return order

    def load_bound(self, queue_lens: Iterable[int]) -> int:
        """ceil(load_factor * mean + 1): a replica whose queue is below this may take one more request."""
        loads = list(queue_lens)
        mean = sum(loads) / len(loads) if loads else 0.0
        return math.ceil(self.load_factor * mean + 1 - LOAD_BOUND_EPS)

    def choose(
        self, session_id: str, queue_lens: Mapping[str, int | None], saturated: Iterable[str] = ()
    ) -> list[str]:
        """Replica ids in order of preference for one request of `session_id`.

        `queue_lens` maps every current replica to its queue length (ongoing + queued requests), or to
        None when unknown (the replica did not answer): those are never preferred and go last.
        `saturated`: replicas whose reported KV use is at the limit; they never qualify either.
        """
        saturated = frozenset(saturated)
        for replica_id, queue_len in queue_lens.items():
            if queue_len is not None and (not isinstance(queue_len, int) or queue_len < 0):
                raise ValueError(f"queue_lens[{replica_id!r}] must be a non-negative int or None, got {queue_len!r}")
        order = self.preference_order(session_id, queue_lens.keys())
        bound = self.load_bound(q for q in queue_lens.values() if q is not None)

        def qualifies(replica_id: str) -> bool:
            queue_len = queue_lens[replica_id]
            if queue_len is None or queue_len >= bound or replica_id in saturated:
                return False
            return self.max_queue_len is None or queue_len < self.max_queue_len

        qualifying = [r for r in order if qualifies(r)]
        ring_rank = {replica_id: rank for rank, replica_id in enumerate(order)}
        overloaded = sorted(
            (r for r in order if not qualifies(r)),
            key=lambda r: (queue_lens[r] is None, r in saturated, queue_lens[r] or 0, ring_rank[r]),
        )
        candidates = qualifying + overloaded
        if candidates[0] == order[0]:
            self.stats.hits += 1
        else:
            self.stats.fallbacks += 1
        return candidates


def session_id_of(pending_request: PendingRequest | None) -> str | None:
    """The `session_id` of the request's first positional argument, or None when it has none.

    GenerateRequest (Router -> DecodeWorker) and PrefillRequest (DecodeWorker -> PrefillWorker) both
    carry one. Anything that is not a non-empty str counts as "no session": routing must not fail.
    """
    if pending_request is None or not pending_request.args:
        return None
    session_id = getattr(pending_request.args[0], "session_id", None)
    return session_id if isinstance(session_id, str) and session_id else None


class SessionAffinityRequestRouter(RequestRouter):
    """Ray Serve request router: `SessionAffinityPolicy` for requests with a session, power of two otherwise.

    KV use comes from the replicas' `record_routing_stats` (see the module docstring); queue lengths
    from Serve's per-handle cache (`replica_queue_len_cache`: kept current by
    Serve on every send, completion and rejection); replicas missing from it (idle for longer than
    the cache's 10 s staleness window, or new) are probed once, as Serve's own routers do.
    No FIFOMixin: each routing task fulfils exactly the request it routed, so the choice made for a
    session is the one that request gets.
    """

    def initialize_state(
        self,
        virtual_nodes: int = 64,
        max_queue_len: int | None = None,
        load_factor: float = 1.25,
        saturated_kv_usage: float = 0.95,
    ) -> None:
        """Called by Serve with `RequestRouterConfig.request_router_kwargs`."""
        if not 0.0 < saturated_kv_usage <= 1.0:
            raise ValueError(f"saturated_kv_usage must lie in (0, 1], got {saturated_kv_usage!r}")
        self.policy = SessionAffinityPolicy(virtual_nodes=virtual_nodes, max_queue_len=max_queue_len, load_factor=load_factor)
        self.saturated_kv_usage = saturated_kv_usage

    def saturated(self, replicas: list[RunningReplica]) -> set[str]:
        """Replicas whose last reported KV-block use is at or above the limit (unreported: not saturated)."""
        return {
            r.replica_id.unique_id
            for r in replicas
            if float((r.routing_stats or {}).get(KV_BLOCK_USAGE, 0.0)) >= self.saturated_kv_usage
        }

    async def _queue_lens(self, replicas: list[RunningReplica]) -> dict[ReplicaID, int | None]:
        queue_lens: dict[ReplicaID, int | None] = {r.replica_id: self.replica_queue_len_cache.get(r.replica_id) for r in replicas}
        unknown = [r for r in replicas if queue_lens[r.replica_id] is None]
        if unknown:
            # Private but stable across 2.4x-2.60; ray.llm's PrefixCacheAffinityRouter calls it the same way.
            for replica, queue_len in await self._probe_queue_lens(unknown, 0):
                queue_lens[replica.replica_id] = queue_len
        return queue_lens

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # Without this Serve retries a round of all-full replicas in a tight loop instead of backing off.
            pending_request.routing_context.should_backoff = True
        session_id = session_id_of(pending_request)
        if session_id is None:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        queue_lens = await self._queue_lens(candidate_replicas)
        by_unique_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ordered = self.policy.choose(
            session_id,
            {r.replica_id.unique_id: queue_lens[r.replica_id] for r in candidate_replicas},
            self.saturated(candidate_replicas),
        )
        return [[by_unique_id[replica_id]] for replica_id in ordered]
