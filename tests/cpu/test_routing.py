"""Session affinity: the pure policy (ring stability, bounded load, determinism) and the Ray Serve router on a local cluster."""

from __future__ import annotations

import asyncio
import math
import os
import random
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
import yaml
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.schema import DeploymentSchema

import mixquant_serve.routing as routing
from mixquant_serve.routing import SessionAffinityPolicy, session_id_of

REPO_ROOT = Path(__file__).resolve().parents[2]
SESSIONS = [f"agent-{i}" for i in range(4000)]


def homes(policy: SessionAffinityPolicy, replica_ids: list[str]) -> dict[str, str]:
    return {s: policy.preference_order(s, replica_ids)[0] for s in SESSIONS}


# ---------------------------------------------------------------- pure policy


def test_preference_order_lists_every_replica_once_and_ignores_key_order():
    replicas = [f"r{i}" for i in range(5)]
    a, b = SessionAffinityPolicy(), SessionAffinityPolicy()
    for session in SESSIONS[:200]:
        order = a.preference_order(session, replicas)
        assert sorted(order) == replicas
        assert b.preference_order(session, list(reversed(replicas))) == order


def test_same_homes_in_another_process_with_another_hash_seed():
    replicas = [f"replica-{i}" for i in range(6)]
    sessions = SESSIONS[:50]
    here = [SessionAffinityPolicy().preference_order(s, replicas)[0] for s in sessions]
    code = (
        "from mixquant_serve.routing import SessionAffinityPolicy\n"
        f"p = SessionAffinityPolicy()\nprint(','.join(p.preference_order(s, {replicas!r})[0] for s in {sessions!r}))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip().split(",") == here


def test_sessions_spread_evenly_over_replicas():
    replicas = [f"r{i}" for i in range(8)]
    counts = {r: 0 for r in replicas}
    for home in homes(SessionAffinityPolicy(virtual_nodes=64), replicas).values():
        counts[home] += 1
    shares = {r: c / len(SESSIONS) for r, c in counts.items()}
    assert all(0.6 / 8 < share < 1.5 / 8 for share in shares.values()), shares


def test_adding_a_replica_moves_about_one_nth_of_sessions_all_to_the_new_one():
    replicas = [f"r{i}" for i in range(8)]
    policy = SessionAffinityPolicy()
    before = homes(policy, replicas)
    after = homes(policy, replicas + ["r8"])
    moved = [s for s in SESSIONS if before[s] != after[s]]
    assert all(after[s] == "r8" for s in moved)
    assert 0.5 / 9 < len(moved) / len(SESSIONS) < 1.6 / 9, len(moved)


def test_removing_a_replica_moves_only_its_sessions():
    replicas = [f"r{i}" for i in range(8)]
    policy = SessionAffinityPolicy()
    before = homes(policy, replicas)
    after = homes(policy, [r for r in replicas if r != "r3"])
    moved = {s for s in SESSIONS if before[s] != after[s]}
    assert moved == {s for s in SESSIONS if before[s] == "r3"}
    assert 0.5 / 8 < len(moved) / len(SESSIONS) < 1.6 / 8, len(moved)


def test_home_is_chosen_while_under_the_load_bound():
    policy = SessionAffinityPolicy(load_factor=1.25)
    loads = {"a": 3, "b": 2, "c": 2, "d": 1}  # mean 2 -> bound ceil(1.25 * 2 + 1) = 4
    for session in SESSIONS[:100]:
        order = policy.preference_order(session, loads)
        assert policy.choose(session, loads)[0] == order[0]
    assert (policy.stats.hits, policy.stats.fallbacks) == (100, 0)


def test_overloaded_home_falls_back_along_the_ring():
    policy = SessionAffinityPolicy(load_factor=1.25)
    session = "hot-session"
    order = policy.preference_order(session, ["a", "b", "c", "d"])
    loads = {r: 1 for r in order}
    loads[order[0]] = 4  # mean 1.75 -> bound ceil(3.1875) = 4: the home is at the bound
    assert policy.load_bound(loads.values()) == 4
    candidates = policy.choose(session, loads)
    assert candidates == order[1:] + [order[0]]
    assert (policy.stats.hits, policy.stats.fallbacks) == (0, 1)


def test_max_queue_len_caps_a_replica_below_the_load_bound():
    policy = SessionAffinityPolicy(max_queue_len=2, load_factor=4.0)
    order = policy.preference_order("s", ["a", "b", "c"])
    loads = {order[0]: 2, order[1]: 0, order[2]: 0}
    assert policy.choose("s", loads)[0] == order[1]


def test_all_replicas_over_max_queue_len_puts_the_least_loaded_first():
    policy = SessionAffinityPolicy(max_queue_len=2)
    order = policy.preference_order("s", ["a", "b", "c"])
    loads = {order[0]: 5, order[1]: 7, order[2]: 3}
    assert policy.choose("s", loads) == [order[2], order[0], order[1]]


def test_unknown_queue_lengths_go_last():
    policy = SessionAffinityPolicy()
    order = policy.preference_order("s", ["a", "b", "c"])
    loads = {order[0]: None, order[1]: 0, order[2]: 0}
    assert policy.choose("s", loads) == [order[1], order[2], order[0]]


def test_hot_session_load_stays_bounded():
    """No completions, one session sending 70% of requests: every replica stays under ceil(c * mean + 1)."""
    rng = random.Random(0)
    policy = SessionAffinityPolicy(load_factor=1.25)
    loads = {f"r{i}": 0 for i in range(4)}
    hot_home = policy.preference_order("hot", loads)[0]
    for _ in range(400):
        session = "hot" if rng.random() < 0.7 else rng.choice(SESSIONS)
        bound = policy.load_bound(loads.values())
        chosen = policy.choose(session, loads)[0]
        assert loads[chosen] < bound
        loads[chosen] += 1
        assert max(loads.values()) <= policy.load_bound(loads.values())
    mean = sum(loads.values()) / len(loads)
    assert max(loads.values()) <= math.ceil(1.25 * mean + 1)
    assert loads[hot_home] < 0.7 * 400  # the hot session spilled over
    assert policy.stats.hits > 0 and policy.stats.fallbacks > 0


@pytest.mark.parametrize(
    "kwargs",
    [{"virtual_nodes": 0}, {"virtual_nodes": 2.5}, {"max_queue_len": 0}, {"load_factor": 0.9}, {"load_factor": float("nan")}],
)
def test_bad_policy_arguments_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SessionAffinityPolicy(**kwargs)


def test_bad_choose_arguments_raise():
    policy = SessionAffinityPolicy()
    with pytest.raises(ValueError, match="replica_ids"):
        policy.choose("s", {})
    with pytest.raises(ValueError, match="queue_lens"):
        policy.choose("s", {"a": -1})
    with pytest.raises(ValueError, match="session_id"):
        policy.choose("", {"a": 0})


def test_saturated_replicas_never_qualify_and_go_after_unsaturated_overloaded_ones():
    policy = SessionAffinityPolicy(virtual_nodes=64, max_queue_len=2)
    replicas = [f"r{i}" for i in range(3)]
    order = policy.preference_order("s", replicas)
    assert policy.choose("s", dict.fromkeys(replicas, 0), saturated=[order[0]]) == [order[1], order[2], order[0]]
    # every replica saturated or over max_queue_len: the unsaturated overloaded one comes first
    queue = {order[0]: 0, order[1]: 5, order[2]: 0}
    assert policy.choose("s", queue, saturated=[order[0], order[2]])[0] == order[1]


def test_session_id_of_reads_the_first_positional_argument():
    from mixquant_serve.protocol import PrefillRequest

    prefill = PrefillRequest(request_id="r1", session_id="agent-7", token_ids=[1, 2], decode_agent="d0")
    assert session_id_of(SimpleNamespace(args=[prefill])) == "agent-7"
    assert session_id_of(SimpleNamespace(args=[])) is None  # e.g. handle.stats.remote()
    assert session_id_of(SimpleNamespace(args=["text"])) is None
    assert session_id_of(SimpleNamespace(args=[SimpleNamespace(session_id=7)])) is None
    assert session_id_of(None) is None


def test_documented_request_router_config_is_valid_for_serve():
    block = re.search(r"^( +request_router_config:.*?)\n\n", routing.__doc__, flags=re.S | re.M).group(1)
    snippet = yaml.safe_load(textwrap.dedent(block))["request_router_config"]
    config = RequestRouterConfig(**snippet)
    DeploymentSchema(name="DecodeWorker", request_router_config=snippet)
    router_cls = config.get_request_router_class()  # what each handle's process unpickles
    assert router_cls.__name__ == "SessionAffinityRequestRouter"
    assert config.request_router_class == "mixquant_serve.routing:SessionAffinityRequestRouter"


# ---------------------------------------------------------------- Ray Serve


ROUTER_KWARGS = {"virtual_nodes": 64, "max_queue_len": 2, "load_factor": 1.25, "saturated_kv_usage": 0.9}


def echo_app(gate):
    """Three replicas that answer with their replica id; a request with hold=True waits for the gate."""
    @serve.deployment(
        num_replicas=3,
        max_ongoing_requests=8,
        ray_actor_options={"num_cpus": 0},
        request_router_config=RequestRouterConfig(
            request_router_class="mixquant_serve.routing:SessionAffinityRequestRouter",
            request_router_kwargs=ROUTER_KWARGS,
            request_routing_stats_period_s=0.5,
        ),
    )
    class Echo:
        def __init__(self, gate) -> None:
            self.gate = gate

        async def __call__(self, request) -> str:
            if request.hold:
                await self.gate.wait.remote()
            return serve.get_replica_context().replica_id.unique_id

        def ping(self) -> str:
            return serve.get_replica_context().replica_id.unique_id

        async def record_routing_stats(self) -> dict[str, float]:
            return {"kv_block_usage": await self.gate.kv_of.remote(serve.get_replica_context().replica_id.unique_id)}

    return Echo.bind(gate)


def make_gate():
    @ray.remote(num_cpus=0)
    class Gate:
        def __init__(self) -> None:
            self.opened = asyncio.Event()
            self.kv: dict[str, float] = {}

        def set_kv(self, replica_id: str, usage: float) -> None:
            self.kv[replica_id] = usage

        def kv_of(self, replica_id: str) -> float:
            return self.kv.get(replica_id, 0.0)

        async def wait(self) -> None:
            await self.opened.wait()

        async def open(self) -> None:
            self.opened.set()

    return Gate.remote()


@pytest.fixture(scope="module")
def echo_handle(ray_serve):
    try:
        gate = make_gate()
        handle = serve.run(echo_app(gate), name="routing-test", route_prefix=None)
        yield handle, gate
    finally:
        serve.delete("routing-test")


def req(session_id: str, hold: bool = False) -> SimpleNamespace:
    return SimpleNamespace(session_id=session_id, hold=hold)


def test_serve_router_affinity_spread_and_overload_fallback(echo_handle):
    handle, gate = echo_handle

    # Every call of one session lands on one replica; sessions spread over all three.
    sessions = [f"s{i}" for i in range(30)]
    landed = {s: {handle.remote(req(s)).result(timeout_s=30) for _ in range(3)} for s in sessions}
    assert all(len(replicas) == 1 for replicas in landed.values()), landed
    home_of = {s: next(iter(replicas)) for s, replicas in landed.items()}
    replica_ids = sorted(set(home_of.values()))
    assert len(replica_ids) == 3, home_of

    # The router's homes are the policy's homes (same ring in every process that holds a handle).
    policy = SessionAffinityPolicy(**{k: v for k, v in ROUTER_KWARGS.items() if k != "saturated_kv_usage"})
    assert all(policy.preference_order(s, replica_ids)[0] == home_of[s] for s in sessions)

    # Requests without a session (no positional argument) still get routed.
    assert handle.ping.remote().result(timeout_s=30) in replica_ids

    # Overload: a hot session parks requests on its home until max_queue_len=2, then spills.
    hot = "hot-session"
    hot_order = policy.preference_order(hot, replica_ids)
    held = []
    for _ in range(4):
        held.append(handle.remote(req(hot, hold=True)))
        time.sleep(0.5)  # let each routing decision (and the queue-length update) land before the next
    # Loads now: home 2, next on the ring 2, last 0 (see the policy: the spill walks the ring).
    quick_hot = handle.remote(req(hot)).result(timeout_s=30)
    assert quick_hot == hot_order[2]
    other_home = next(s for s in sessions if home_of[s] == hot_order[0])
    assert handle.remote(req(other_home)).result(timeout_s=30) != hot_order[0]
    idle_home = next(s for s in sessions if home_of[s] == hot_order[2])
    assert handle.remote(req(idle_home)).result(timeout_s=30) == hot_order[2]  # affinity kept where load allows

    ray.get(gate.open.remote())
    held_landed = [r.result(timeout_s=30) for r in held]
    assert held_landed == [hot_order[0], hot_order[0], hot_order[1], hot_order[1]]
    # Load gone: the hot session is back home.
    time.sleep(0.5)  # let the completions reach the queue-length cache
    assert handle.remote(req(hot)).result(timeout_s=30) == hot_order[0]


def test_serve_router_avoids_a_replica_that_reports_a_full_kv_cache(echo_handle):
    handle, gate = echo_handle
    session = "kv-session"
    home = handle.remote(req(session)).result(timeout_s=30)
    ray.get(gate.set_kv.remote(home, 0.97))  # reported through record_routing_stats
    deadline = time.monotonic() + 30
    while handle.remote(req(session)).result(timeout_s=30) == home:
        assert time.monotonic() < deadline, "the router kept sending the session to its saturated home"
        time.sleep(0.25)
    assert all(handle.remote(req(session)).result(timeout_s=30) != home for _ in range(5))
    ray.get(gate.set_kv.remote(home, 0.1))
    deadline = time.monotonic() + 30
    while handle.remote(req(session)).result(timeout_s=30) != home:
        assert time.monotonic() < deadline, "the session did not return home once its KV use dropped"
        time.sleep(0.25)

