"""Per-pool autoscaling: each pool scales on its own load signal, not on request counts.

A prefill request of 30K tokens and one of 300 tokens are one "ongoing request" each to Serve's
default policy, and ten decode sequences with 30K-token histories can fill a KV cache that forty
short ones barely touch. So each pool reports the signal that limits it:

| pool    | metric (per replica, float) | meaning                                          | target (policy_kwargs)             |
| ------- | --------------------------- | ------------------------------------------------ | ---------------------------------- |
| prefill | `queued_prefill_tokens`     | prompt tokens waiting for or in prefill          | `target_queued_tokens_per_replica` |
| decode  | `kv_block_usage`            | fraction of the KV blocks referenced (0..1)      | `target_kv_usage`                  |
| decode  | `running_seqs`              | sequences in the running batch                   | `target_running_seqs_per_replica`  |

How the numbers reach the policy (Ray Serve 2.60): the deployment class defines
`record_autoscaling_stats(self) -> dict[str, float]` (sync or async); each replica calls it every
min(0.2 * look_back_period_s, metrics_interval_s) seconds and pushes the samples to the controller
every `metrics_interval_s` (10 s by default); the controller hands the policy
`ctx.aggregated_metrics[name][replica_id]`: each replica's samples over `look_back_period_s`,
reduced by `aggregation_function` (mean by default).

    @serve.deployment
    class PrefillDeployment:
        def record_autoscaling_stats(self) -> dict[str, float]:
            return {"queued_prefill_tokens": float(queued_tokens)}

The decision, per pool, in replica units ("demand": replicas needed to sit exactly at target):

- prefill: demand = total queued prefill tokens / target_queued_tokens_per_replica
- decode:  demand = max(current * mean kv_block_usage / target_kv_usage,
                        total running_seqs / target_running_seqs_per_replica)
- scale up to ceil(demand) as soon as demand > current replicas;
- scale down only when demand < scale_down_utilization * current (hysteresis), and then only to
  ceil(demand / scale_down_utilization), so the pool lands at that utilization and not right at
  the up-threshold: a small bump after a downscale does not scale straight back up;
- clamp to [min_replicas, max_replicas] (Serve's capacity-adjusted bounds).
Replicas that have not reported yet (just started) count as the mean of those that have. With no
report at all the policy returns Serve's default request-based decision
(`replica_queue_length_autoscaling_policy`, i.e. `target_ongoing_requests`), clamped the same way.
Serve then applies `upscale_delay_s` / `downscale_delay_s` and the scaling factors on top.

Ray 2.60 passes `policy_kwargs` only to a policy *class* (instantiated once by the controller, then
called with each tick's `AutoscalingContext`); a plain function gets none. Hence two classes:

    autoscaling_config:            # under the PrefillWorker deployment (serve config YAML)
      min_replicas: 1
      max_replicas: 4
      upscale_delay_s: 10
      downscale_delay_s: 60
      look_back_period_s: 30
      policy:
        policy_function: mixquant_serve.autoscaling:PrefillAutoscalingPolicy
        policy_kwargs: {target_queued_tokens_per_replica: 8192, scale_down_utilization: 0.5}

    autoscaling_config:            # under the DecodeWorker deployment
      min_replicas: 1
      max_replicas: 4
      policy:
        policy_function: mixquant_serve.autoscaling:DecodeAutoscalingPolicy
        policy_kwargs: {target_kv_usage: 0.7, target_running_seqs_per_replica: 24}

The same dicts work as `@serve.deployment(autoscaling_config={...})` or
`ray.serve.config.AutoscalingConfig(**snippet)`.

Application level: the prefill:decode ratio. Each pool scales on its own signal, but a prefill pool
far larger than the decode pool it feeds (or the reverse) means one of them waits on the other.
`PoolRatioAutoscalingPolicy` is a Ray Serve application-level policy (`autoscaling_policy` of the
application in the serve config YAML; Ray 2.60 calls it with every autoscaling deployment's context
and it takes precedence over the per-deployment policies, which it runs itself):

    applications:
      - name: mixquant
        import_path: mixquant_serve.app:build_app
        autoscaling_policy:
          policy_function: mixquant_serve.autoscaling:PoolRatioAutoscalingPolicy
          policy_kwargs: {min_prefill_per_decode: 0.25, max_prefill_per_decode: 4.0}

Each tick it (1) runs each pool's own policy, taken from that deployment's `autoscaling_config.policy`
with its kwargs (so the per-pool targets stay where they are configured), then (2) keeps
min_prefill_per_decode <= prefill / decode <= max_prefill_per_decode by raising the lagging pool
(never by taking away replicas a pool's own load asks for); only where the lagging pool is at its
max_replicas is the other pool capped instead. Serve's wrapper then applies each deployment's
min/max replicas and up/downscale delays. Ray 2.60 logs a warning per deployment that the
application-level policy takes precedence: that is the intent. An application started from Python
(`serve.run(build_app(...))`) has no application-level policy (Serve's Python API takes none): its
pools scale independently on the per-deployment policies.

The controller unpickles this module by value, so it imports only the standard library and Ray.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingContext

PREFILL_DEPLOYMENT = "PrefillWorker"  # deployment names given in mixquant_serve.app
DECODE_DEPLOYMENT = "DecodeWorker"

QUEUED_PREFILL_TOKENS = "queued_prefill_tokens"
KV_BLOCK_USAGE = "kv_block_usage"
RUNNING_SEQS = "running_seqs"
DEFAULT_SCALE_DOWN_UTILIZATION = 0.5  # scale down only below half the target load


def _check_bounds(current_replicas: int, min_replicas: int, max_replicas: int) -> None:
    if current_replicas < 0:
        raise ValueError(f"current_replicas must be >= 0, got {current_replicas}")
    if min_replicas < 0 or max_replicas < min_replicas:
        raise ValueError(f"need 0 <= min_replicas <= max_replicas, got min_replicas={min_replicas}, max_replicas={max_replicas}")


def _check_scale_down_utilization(scale_down_utilization: float) -> None:
    if not 0.0 < scale_down_utilization < 1.0:
        raise ValueError(f"scale_down_utilization must lie in (0, 1), got {scale_down_utilization}")


def clamp_replicas(desired: float, min_replicas: int, max_replicas: int) -> int:
    """ceil(desired) within [min_replicas, max_replicas]."""
    return max(min_replicas, min(max_replicas, math.ceil(desired)))


def replicas_for_demand(
    *, current_replicas: int, demand: float, scale_down_utilization: float, min_replicas: int, max_replicas: int
) -> int:
    """Replica count for `demand` (replicas needed at exactly the target), with a hysteresis band.

    Up to ceil(demand) when demand > current; down to ceil(demand / scale_down_utilization) only when
    demand < scale_down_utilization * current; otherwise stay. Clamped to [min_replicas, max_replicas].
    """
    _check_bounds(current_replicas, min_replicas, max_replicas)
    _check_scale_down_utilization(scale_down_utilization)
    if demand < 0 or not math.isfinite(demand):
        raise ValueError(f"demand must be finite and >= 0, got {demand}")
    if demand > current_replicas:
        desired = math.ceil(demand)
    elif demand < scale_down_utilization * current_replicas:
        desired = math.ceil(demand / scale_down_utilization)
    else:
        desired = current_replicas
    return clamp_replicas(desired, min_replicas, max_replicas)


def desired_prefill_replicas(
    *,
    current_replicas: int,
    queued_prefill_tokens: float,
    target_queued_tokens_per_replica: float,
    min_replicas: int,
    max_replicas: int,
    scale_down_utilization: float = DEFAULT_SCALE_DOWN_UTILIZATION,
) -> int:
    """Prefill pool size for `queued_prefill_tokens` (the pool's total) at the per-replica target."""
    if target_queued_tokens_per_replica <= 0:
        raise ValueError(f"target_queued_tokens_per_replica must be > 0, got {target_queued_tokens_per_replica}")
    if queued_prefill_tokens < 0:
        raise ValueError(f"queued_prefill_tokens must be >= 0, got {queued_prefill_tokens}")
    return replicas_for_demand(
        current_replicas=current_replicas,
        demand=queued_prefill_tokens / target_queued_tokens_per_replica,
        scale_down_utilization=scale_down_utilization,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
    )


def desired_decode_replicas(
    *,
    current_replicas: int,
    mean_kv_block_usage: float,
    running_seqs: float,
    target_kv_usage: float,
    target_running_seqs_per_replica: float,
    min_replicas: int,
    max_replicas: int,
    scale_down_utilization: float = DEFAULT_SCALE_DOWN_UTILIZATION,
) -> int:
    """Decode pool size: the larger demand of KV-cache use (mean over replicas) and running sequences (pool total)."""
    if not 0.0 < target_kv_usage <= 1.0:
        raise ValueError(f"target_kv_usage must lie in (0, 1], got {target_kv_usage}")
    if target_running_seqs_per_replica <= 0:
        raise ValueError(f"target_running_seqs_per_replica must be > 0, got {target_running_seqs_per_replica}")
    if not 0.0 <= mean_kv_block_usage <= 1.0:
        raise ValueError(f"mean_kv_block_usage must lie in [0, 1], got {mean_kv_block_usage}")
    if running_seqs < 0:
        raise ValueError(f"running_seqs must be >= 0, got {running_seqs}")
    kv_demand = current_replicas * mean_kv_block_usage / target_kv_usage
    seqs_demand = running_seqs / target_running_seqs_per_replica
    return replicas_for_demand(
        current_replicas=current_replicas,
        demand=max(kv_demand, seqs_demand),
        scale_down_utilization=scale_down_utilization,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
    )


def reported_values(ctx: AutoscalingContext, metric: str) -> list[float] | None:
    """The running replicas' aggregated values of `metric`, or None when none has reported it."""
    aggregated: Mapping[Any, Mapping[Any, float]] | None = ctx.aggregated_metrics
    per_replica = (aggregated or {}).get(metric) or {}
    values = [per_replica[replica_id] for replica_id in ctx.running_replicas if replica_id in per_replica]
    return values or None


def pool_total(values: list[float], num_replicas: int) -> float:
    """Sum over the pool, counting each replica that has not reported yet as the mean of those that have."""
    return sum(values) / len(values) * max(num_replicas, len(values))


def default_decision(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    """Serve's request-based policy (target_ongoing_requests), clamped like ours."""
    desired, state = replica_queue_length_autoscaling_policy(ctx)
    return clamp_replicas(desired, ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas), state


class PrefillAutoscalingPolicy:
    """Serve autoscaling policy of the prefill pool: `queued_prefill_tokens` against a per-replica target."""

    def __init__(
        self, target_queued_tokens_per_replica: int, scale_down_utilization: float = DEFAULT_SCALE_DOWN_UTILIZATION
    ) -> None:
        if target_queued_tokens_per_replica <= 0:
            raise ValueError(f"target_queued_tokens_per_replica must be > 0, got {target_queued_tokens_per_replica}")
        _check_scale_down_utilization(scale_down_utilization)
        self.target_queued_tokens_per_replica = target_queued_tokens_per_replica
        self.scale_down_utilization = scale_down_utilization

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        queued = reported_values(ctx, QUEUED_PREFILL_TOKENS)
        if queued is None:
            return default_decision(ctx)
        desired = desired_prefill_replicas(
            current_replicas=ctx.current_num_replicas,
            queued_prefill_tokens=pool_total(queued, ctx.current_num_replicas),
            target_queued_tokens_per_replica=self.target_queued_tokens_per_replica,
            min_replicas=ctx.capacity_adjusted_min_replicas,
            max_replicas=ctx.capacity_adjusted_max_replicas,
            scale_down_utilization=self.scale_down_utilization,
        )
        return desired, {}


class DecodeAutoscalingPolicy:
    """Serve autoscaling policy of the decode pool: `kv_block_usage` and `running_seqs` against targets."""

    def __init__(
        self,
        target_kv_usage: float,
        target_running_seqs_per_replica: int,
        scale_down_utilization: float = DEFAULT_SCALE_DOWN_UTILIZATION,
    ) -> None:
        if not 0.0 < target_kv_usage <= 1.0:
            raise ValueError(f"target_kv_usage must lie in (0, 1], got {target_kv_usage}")
        if target_running_seqs_per_replica <= 0:
            raise ValueError(f"target_running_seqs_per_replica must be > 0, got {target_running_seqs_per_replica}")
        _check_scale_down_utilization(scale_down_utilization)
        self.target_kv_usage = target_kv_usage
        self.target_running_seqs_per_replica = target_running_seqs_per_replica
        self.scale_down_utilization = scale_down_utilization

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        kv_usage = reported_values(ctx, KV_BLOCK_USAGE)
        running = reported_values(ctx, RUNNING_SEQS)
        if kv_usage is None or running is None:
            return default_decision(ctx)
        desired = desired_decode_replicas(
            current_replicas=ctx.current_num_replicas,
            mean_kv_block_usage=min(1.0, sum(kv_usage) / len(kv_usage)),
            running_seqs=pool_total(running, ctx.current_num_replicas),
            target_kv_usage=self.target_kv_usage,
            target_running_seqs_per_replica=self.target_running_seqs_per_replica,
            min_replicas=ctx.capacity_adjusted_min_replicas,
            max_replicas=ctx.capacity_adjusted_max_replicas,
            scale_down_utilization=self.scale_down_utilization,
        )
        return desired, {}


def keep_pool_ratio(
    *,
    prefill: int,
    decode: int,
    min_prefill_per_decode: float,
    max_prefill_per_decode: float,
    prefill_bounds: tuple[int, int],
    decode_bounds: tuple[int, int],
) -> tuple[int, int]:
    """(prefill, decode) replica counts with min <= prefill / decode <= max, raising the lagging pool first.

    Bounds are (min_replicas, max_replicas) per pool; the result always lies within them, so where
    the bounds make the ratio unreachable the ratio gives way.
    """
    if not 0.0 < min_prefill_per_decode <= max_prefill_per_decode:
        raise ValueError("need 0 < min_prefill_per_decode <= max_prefill_per_decode, got "
                         f"{min_prefill_per_decode} and {max_prefill_per_decode}")
    for name, (low, high) in (("prefill_bounds", prefill_bounds), ("decode_bounds", decode_bounds)):
        if low < 0 or high < low:
            raise ValueError(f"{name} must be (min, max) with 0 <= min <= max, got {(low, high)}")
    prefill = clamp_replicas(prefill, *prefill_bounds)
    decode = clamp_replicas(decode, *decode_bounds)
    if prefill > max_prefill_per_decode * decode:
        decode = clamp_replicas(prefill / max_prefill_per_decode, *decode_bounds)
        if prefill > max_prefill_per_decode * decode:
            prefill = max(prefill_bounds[0], math.floor(max_prefill_per_decode * decode))
    elif prefill < min_prefill_per_decode * decode:
        prefill = clamp_replicas(min_prefill_per_decode * decode, *prefill_bounds)
        if prefill < min_prefill_per_decode * decode:
            decode = max(decode_bounds[0], math.floor(prefill / min_prefill_per_decode))
    return prefill, decode


class PoolRatioAutoscalingPolicy:
    """Serve application-level policy: every pool's own policy, then the prefill:decode ratio kept in bounds."""

    def __init__(self, min_prefill_per_decode: float = 0.25, max_prefill_per_decode: float = 4.0) -> None:
        if not 0.0 < min_prefill_per_decode <= max_prefill_per_decode:
            raise ValueError("need 0 < min_prefill_per_decode <= max_prefill_per_decode, got "
                             f"{min_prefill_per_decode} and {max_prefill_per_decode}")
        self.min_prefill_per_decode = float(min_prefill_per_decode)
        self.max_prefill_per_decode = float(max_prefill_per_decode)
        self._pool_policies: dict[Any, tuple[Any, Any]] = {}  # deployment id -> (its policy config, callable)

    def _pool_policy(self, deployment_id: Any, ctx: AutoscalingContext) -> Any:
        """The deployment's own policy, instantiated once per policy config (classes get their kwargs)."""
        policy_config = ctx.config.policy
        cached = self._pool_policies.get(deployment_id)
        if cached is not None and cached[0] == policy_config:
            return cached[1]
        raw = policy_config.get_policy()
        policy = raw(**policy_config.policy_kwargs) if isinstance(raw, type) else raw
        self._pool_policies[deployment_id] = (policy_config, policy)
        return policy

    def __call__(self, contexts: Mapping[Any, AutoscalingContext]) -> tuple[dict[Any, int], dict[Any, dict[str, Any]]]:
        decisions: dict[Any, int] = {}
        states: dict[Any, dict[str, Any]] = {}
        for deployment_id, ctx in contexts.items():
            decisions[deployment_id], states[deployment_id] = self._pool_policy(deployment_id, ctx)(ctx)
        by_name = {deployment_id.name: deployment_id for deployment_id in contexts}
        prefill_id, decode_id = by_name.get(PREFILL_DEPLOYMENT), by_name.get(DECODE_DEPLOYMENT)
        if prefill_id is not None and decode_id is not None:
            prefill_ctx, decode_ctx = contexts[prefill_id], contexts[decode_id]
            decisions[prefill_id], decisions[decode_id] = keep_pool_ratio(
                prefill=decisions[prefill_id],
                decode=decisions[decode_id],
                min_prefill_per_decode=self.min_prefill_per_decode,
                max_prefill_per_decode=self.max_prefill_per_decode,
                prefill_bounds=(prefill_ctx.capacity_adjusted_min_replicas, prefill_ctx.capacity_adjusted_max_replicas),
                decode_bounds=(decode_ctx.capacity_adjusted_min_replicas, decode_ctx.capacity_adjusted_max_replicas),
            )
        return decisions, states
