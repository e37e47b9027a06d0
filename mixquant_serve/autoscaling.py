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
`ray.serve.config.AutoscalingConfig(**snippet)`. Ray 2.60 also has an application-level policy
(`autoscaling_policy` in the application's config: one function sees every deployment's context);
its schema still calls it "under development", so the pools use these per-deployment policies.

The controller unpickles this module by value, so it imports only the standard library and Ray.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingContext

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
