"""Per-pool autoscaling: the pure decisions, the adapter on a real AutoscalingContext, the documented
config snippets, and one scale-up through a local Ray Serve controller."""

from __future__ import annotations

import random
import re
import textwrap
import time

import pytest
import ray
import yaml
from ray import serve
from ray.serve._private.common import DeploymentID  # AutoscalingContext wants one; Serve has no public alias
from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingConfig, AutoscalingContext
from ray.serve.request_router import ReplicaID

import mixquant_serve.autoscaling as autoscaling
from mixquant_serve.autoscaling import (
    DecodeAutoscalingPolicy,
    PrefillAutoscalingPolicy,
    desired_decode_replicas,
    desired_prefill_replicas,
    replicas_for_demand,
)

TOKENS = 8192  # target_queued_tokens_per_replica in these tests


def prefill(current: int, queued: float, lo: int = 1, hi: int = 8) -> int:
    return desired_prefill_replicas(
        current_replicas=current,
        queued_prefill_tokens=queued,
        target_queued_tokens_per_replica=TOKENS,
        min_replicas=lo,
        max_replicas=hi,
    )


def decode(current: int, kv: float, seqs: float, lo: int = 1, hi: int = 8) -> int:
    return desired_decode_replicas(
        current_replicas=current,
        mean_kv_block_usage=kv,
        running_seqs=seqs,
        target_kv_usage=0.7,
        target_running_seqs_per_replica=24,
        min_replicas=lo,
        max_replicas=hi,
    )


# ---------------------------------------------------------------- pure decisions


def test_prefill_scales_up_as_soon_as_queued_tokens_exceed_the_target():
    assert prefill(2, 2 * TOKENS) == 2  # exactly at target: stay
    assert prefill(2, 2 * TOKENS + 1) == 3
    assert prefill(2, 5.5 * TOKENS) == 6


def test_prefill_scales_down_only_well_under_target_and_lands_at_that_utilization():
    assert prefill(4, 2.5 * TOKENS) == 4  # 62% of target: inside the band
    assert prefill(4, 2.0 * TOKENS) == 4  # 50%: still inside
    assert prefill(4, 1.5 * TOKENS) == 3  # 37.5%: down to ceil(1.5 / 0.5)
    assert prefill(4, 0) == 1  # idle: min_replicas


def test_prefill_clamps_to_bounds():
    assert prefill(2, 100 * TOKENS, hi=4) == 4
    assert prefill(3, 0, lo=2) == 2
    assert prefill(0, 0, lo=0) == 0


def test_decision_is_a_fixed_point_so_it_does_not_flap():
    rng = random.Random(0)
    for _ in range(2000):
        current, demand = rng.randint(0, 20), rng.uniform(0, 25)
        lo = rng.randint(0, 3)
        hi = rng.randint(max(lo, 1), 20)
        kwargs = dict(demand=demand, scale_down_utilization=rng.choice([0.3, 0.5, 0.8]), min_replicas=lo, max_replicas=hi)
        once = replicas_for_demand(current_replicas=current, **kwargs)
        assert replicas_for_demand(current_replicas=once, **kwargs) == once, (current, kwargs)


def test_decode_scales_on_the_larger_of_kv_use_and_running_sequences():
    assert decode(2, kv=0.9, seqs=10) == 3  # kv: 2 * 0.9 / 0.7 = 2.57
    assert decode(2, kv=0.1, seqs=100) == 5  # seqs: 100 / 24 = 4.17
    assert decode(2, kv=0.7, seqs=48) == 2  # both at target


def test_decode_scales_down_only_when_both_signals_are_low():
    assert decode(4, kv=0.1, seqs=10) == 2  # demand max(0.57, 0.42) < 2 -> ceil(0.57 / 0.5)
    assert decode(4, kv=0.6, seqs=10) == 4  # kv demand 3.4: inside the band
    assert decode(4, kv=0.1, seqs=80) == 4  # seqs demand 3.3: inside the band


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: prefill(-1, 0), "current_replicas"),
        (lambda: prefill(1, -5), "queued_prefill_tokens"),
        (lambda: prefill(1, 0, lo=3, hi=2), "min_replicas"),
        (lambda: decode(1, kv=1.5, seqs=0), "mean_kv_block_usage"),
        (lambda: decode(1, kv=0.5, seqs=-1), "running_seqs"),
        (lambda: PrefillAutoscalingPolicy(target_queued_tokens_per_replica=0), "target_queued_tokens_per_replica"),
        (lambda: PrefillAutoscalingPolicy(8192, scale_down_utilization=1.0), "scale_down_utilization"),
        (lambda: DecodeAutoscalingPolicy(target_kv_usage=0.0, target_running_seqs_per_replica=8), "target_kv_usage"),
        (lambda: DecodeAutoscalingPolicy(target_kv_usage=0.5, target_running_seqs_per_replica=0), "target_running_seqs"),
    ],
)
def test_bad_arguments_raise(call, name):
    with pytest.raises(ValueError, match=name):
        call()


# ---------------------------------------------------------------- adapter on Ray's context


def make_ctx(
    replicas: list[ReplicaID],
    metrics: dict[str, dict[ReplicaID, float]] | None,
    total_num_requests: float = 0.0,
    config: AutoscalingConfig | None = None,
):
    config = config or AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=2)
    return AutoscalingContext(
        deployment_id=DeploymentID(name="Pool", app_name="app"),
        deployment_name="Pool",
        app_name="app",
        current_num_replicas=len(replicas),
        target_num_replicas=len(replicas),
        running_replicas=replicas,
        total_num_requests=total_num_requests,
        total_queued_requests=0.0,
        aggregated_metrics=metrics,
        raw_metrics=None,
        capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=time.time(),
        config=config,
    )


def replica_ids(n: int) -> list[ReplicaID]:
    return [ReplicaID(unique_id=f"r{i}", deployment_id=DeploymentID(name="Pool", app_name="app")) for i in range(n)]


def test_prefill_policy_sums_queued_tokens_of_running_replicas():
    running, stopped = replica_ids(3), replica_ids(4)[3]
    queued = {running[0]: 20000.0, running[1]: 9000.0, running[2]: 4000.0, stopped: 1e9}
    desired, _ = PrefillAutoscalingPolicy(TOKENS)(make_ctx(running, {"queued_prefill_tokens": queued}))
    assert desired == prefill(3, 33000.0)


def test_prefill_policy_counts_unreported_replicas_as_the_mean():
    running = replica_ids(4)
    reported = {running[0]: 30000.0, running[1]: 10000.0}  # mean 20000 -> pool total 80000
    desired, _ = PrefillAutoscalingPolicy(TOKENS)(make_ctx(running, {"queued_prefill_tokens": reported}))
    assert desired == prefill(4, 80000.0)


def test_policies_fall_back_to_serves_request_based_decision_without_metrics():
    running = replica_ids(2)
    ctx = make_ctx(running, {"some_other_metric": {running[0]: 1.0}}, total_num_requests=10.0)
    expected, _ = replica_queue_length_autoscaling_policy(ctx)  # 2 replicas * 10 / (2 * target 2) = 5
    assert PrefillAutoscalingPolicy(TOKENS)(ctx)[0] == expected == 5
    assert DecodeAutoscalingPolicy(0.7, 24)(make_ctx(running, None, total_num_requests=10.0))[0] == 5
    busy = make_ctx(running, None, total_num_requests=1000.0)
    assert PrefillAutoscalingPolicy(TOKENS)(busy)[0] == 8  # clamped to max_replicas


def test_decode_policy_reads_kv_use_and_running_sequences():
    running = replica_ids(2)
    metrics = {"kv_block_usage": {running[0]: 0.95, running[1]: 0.85}, "running_seqs": {running[0]: 12.0, running[1]: 8.0}}
    desired, _ = DecodeAutoscalingPolicy(0.7, 24)(make_ctx(running, metrics))
    assert desired == decode(2, kv=0.9, seqs=20) == 3


# ---------------------------------------------------------------- the documented config snippets


def documented_autoscaling_configs() -> list[dict]:
    """The `autoscaling_config:` YAML blocks of the module docstring, parsed."""
    blocks = re.findall(r"^( +autoscaling_config:.*?)\n\n", autoscaling.__doc__, flags=re.S | re.M)
    return [yaml.safe_load(textwrap.dedent(block))["autoscaling_config"] for block in blocks]


def test_documented_snippets_are_valid_ray_configs_that_build_working_policies():
    from ray.serve.schema import DeploymentSchema

    snippets = documented_autoscaling_configs()
    assert [s["policy"]["policy_function"] for s in snippets] == [
        "mixquant_serve.autoscaling:PrefillAutoscalingPolicy",
        "mixquant_serve.autoscaling:DecodeAutoscalingPolicy",
    ]
    running = replica_ids(2)
    metrics = {
        "queued_prefill_tokens": {r: 3.0 * TOKENS for r in running},
        "kv_block_usage": {r: 0.1 for r in running},
        "running_seqs": {r: 100.0 for r in running},
    }
    for snippet, expected in zip(snippets, [6, 9]):  # prefill: 6 * 8192 / 8192; decode: 200 running / 24 = 8.3
        config = AutoscalingConfig(**snippet)
        DeploymentSchema(name="Pool", autoscaling_config=snippet)
        policy_cls = config.policy.get_policy()  # what the controller unpickles
        policy = policy_cls(**config.policy.policy_kwargs)
        assert policy(make_ctx(running, metrics, config=config))[0] == min(expected, config.max_replicas) == 4


# ---------------------------------------------------------------- through the Serve controller


def loaded_pool(name: str, policy_function: str, policy_kwargs: dict, stats: dict[str, float]):
    @serve.deployment(
        name=name,
        ray_actor_options={"num_cpus": 0},
        autoscaling_config={
            "min_replicas": 1,
            "max_replicas": 2,
            "upscale_delay_s": 0,
            "downscale_delay_s": 600,
            "look_back_period_s": 1.0,
            "metrics_interval_s": 0.25,  # deprecated in 2.60 but still the replica's push period (default 10 s)
            "policy": {"policy_function": policy_function, "policy_kwargs": policy_kwargs},
        },
    )
    class Pool:
        def record_autoscaling_stats(self) -> dict[str, float]:
            return stats

        def __call__(self) -> str:
            return "ok"

    return Pool.bind()


# ---------------------------------------------------------------- application level: the pool ratio


@pytest.mark.parametrize(
    "prefill, decode, expected",
    [
        (2, 1, (2, 1)),  # within [0.5, 2]
        (6, 1, (6, 3)),  # prefill ran ahead: decode is raised, prefill keeps what its load asks for
        (8, 1, (8, 4)),
        (1, 4, (2, 4)),  # decode ran ahead: prefill is raised
        (8, 8, (8, 8)),
        (1, 1, (1, 1)),
    ],
)
def test_pool_ratio_raises_the_lagging_pool(prefill, decode, expected):
    got = autoscaling.keep_pool_ratio(prefill=prefill, decode=decode, min_prefill_per_decode=0.5, max_prefill_per_decode=2.0,
                                      prefill_bounds=(1, 8), decode_bounds=(1, 8))
    assert got == expected


def test_pool_ratio_caps_the_leading_pool_only_when_the_other_is_at_its_max():
    # decode may not exceed 2, so prefill is capped at 2 * 2 = 4 although its own policy asked for 7
    assert autoscaling.keep_pool_ratio(prefill=7, decode=1, min_prefill_per_decode=0.5, max_prefill_per_decode=2.0,
                                       prefill_bounds=(1, 8), decode_bounds=(1, 2)) == (4, 2)
    # prefill may not exceed 1, so decode is capped at 1 / 0.5 = 2
    assert autoscaling.keep_pool_ratio(prefill=1, decode=6, min_prefill_per_decode=0.5, max_prefill_per_decode=2.0,
                                       prefill_bounds=(1, 1), decode_bounds=(1, 8)) == (1, 2)
    # bounds win over the ratio: both pools pinned at 1 and 5 stay there
    assert autoscaling.keep_pool_ratio(prefill=1, decode=5, min_prefill_per_decode=0.5, max_prefill_per_decode=2.0,
                                       prefill_bounds=(1, 1), decode_bounds=(5, 5)) == (1, 5)


@pytest.mark.parametrize("low, high", [(0.0, 1.0), (2.0, 1.0), (-1.0, 1.0)])
def test_pool_ratio_rejects_bad_bounds(low, high):
    with pytest.raises(ValueError, match="min_prefill_per_decode"):
        autoscaling.PoolRatioAutoscalingPolicy(min_prefill_per_decode=low, max_prefill_per_decode=high)


def pool_ctx(name: str, replicas: int, metrics: dict[str, float], policy: str, kwargs: dict, max_replicas: int = 8):
    deployment_id = DeploymentID(name=name, app_name="mixquant")
    ids = [ReplicaID(unique_id=f"{name}-{i}", deployment_id=deployment_id) for i in range(replicas)]
    config = AutoscalingConfig(min_replicas=1, max_replicas=max_replicas,
                               policy={"policy_function": policy, "policy_kwargs": kwargs})
    ctx = make_ctx(ids, {metric: {r: value for r in ids} for metric, value in metrics.items()}, config=config)
    ctx.deployment_id, ctx.deployment_name, ctx.app_name = deployment_id, name, "mixquant"
    return deployment_id, ctx


def test_application_policy_runs_each_pool_policy_then_keeps_the_ratio():
    prefill_id, prefill_ctx = pool_ctx("PrefillWorker", 1, {"queued_prefill_tokens": 5 * TOKENS},
                                       "mixquant_serve.autoscaling:PrefillAutoscalingPolicy",
                                       {"target_queued_tokens_per_replica": TOKENS})
    decode_id, decode_ctx = pool_ctx("DecodeWorker", 1, {"kv_block_usage": 0.1, "running_seqs": 1.0},
                                     "mixquant_serve.autoscaling:DecodeAutoscalingPolicy",
                                     {"target_kv_usage": 0.7, "target_running_seqs_per_replica": 24})
    policy = autoscaling.PoolRatioAutoscalingPolicy(min_prefill_per_decode=0.25, max_prefill_per_decode=4.0)
    decisions, states = policy({prefill_id: prefill_ctx, decode_id: decode_ctx})
    # prefill's own policy asks for 5 replicas; decode's for 1; the ratio 5:1 > 4 raises decode to 2
    assert decisions == {prefill_id: 5, decode_id: 2}
    assert set(states) == {prefill_id, decode_id}
    wide = autoscaling.PoolRatioAutoscalingPolicy(min_prefill_per_decode=0.25, max_prefill_per_decode=8.0)
    assert wide({prefill_id: prefill_ctx, decode_id: decode_ctx})[0] == {prefill_id: 5, decode_id: 1}
    # a pool alone (e.g. another app's deployment) is just its own policy
    assert wide({prefill_id: prefill_ctx})[0] == {prefill_id: 5}


@pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning")
def test_serve_controller_scales_each_pool_on_its_own_metric(ray_serve):
    """With Serve's default policy neither pool would scale (no requests at all): the custom metrics do it."""
    try:
        pools = {
            "prefill": loaded_pool(
                "PrefillPool",
                "mixquant_serve.autoscaling:PrefillAutoscalingPolicy",
                {"target_queued_tokens_per_replica": 100},
                {"queued_prefill_tokens": 1000.0},
            ),
            "decode": loaded_pool(
                "DecodePool",
                "mixquant_serve.autoscaling:DecodeAutoscalingPolicy",
                {"target_kv_usage": 0.5, "target_running_seqs_per_replica": 8},
                {"kv_block_usage": 0.9, "running_seqs": 2.0},
            ),
        }
        for app, pool in pools.items():
            serve.run(pool, name=app, route_prefix=None)
        deadline = time.monotonic() + 45
        running: dict[str, int] = {}
        while time.monotonic() < deadline:
            status = serve.status().applications
            running = {
                app: status[app].deployments[dep].replica_states.get("RUNNING", 0)
                for app, dep in [("prefill", "PrefillPool"), ("decode", "DecodePool")]
            }
            if all(n == 2 for n in running.values()):
                break
            time.sleep(0.5)
        assert running == {"prefill": 2, "decode": 2}
    finally:
        for app in ("prefill", "decode"):
            serve.delete(app)
