"""`build_app(args) -> serve.Application`: the import_path of serve_config.yaml.

    HTTP ──▶ Router (ingress, OpenAI API)                     router.num_replicas, router.num_cpus
               │ DeploymentHandle, session-affinity routing
               ▼
             DecodeReplica pool (precise decode, owns each request)   decode.resources / autoscaling
               │ DeploymentHandle, session-affinity routing; KV over NIXL
               ▼
             PrefillReplica pool (NVFP4 / FP8 prefill)                prefill.resources / autoscaling

Each pool is its own deployment with its own resources, session-affinity request router and
autoscaling policy on its own load signal (prefill: queued prompt tokens; decode: KV use and
running sequences). With `prefill.enabled: false` there is no prefill pool: decode replicas
prefill every prompt themselves (co-located serving).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from mixquant_serve.config import AppConfig, Autoscaling
from mixquant_serve.model.checkpoint import open_checkpoint
from mixquant_serve.model.config import ModelConfig
from mixquant_serve.router import ServerSettings, load_tokenizer, router_deployment
from mixquant_serve.security import ApiKeySource
from workers.serve import DecodeReplica, PrefillReplica

SESSION_ROUTER = "mixquant_serve.routing:SessionAffinityRequestRouter"
AUTOSCALING_METRICS_INTERVAL_S = 2.0  # how often replicas push their load to the autoscaler
ROUTING_STATS_PERIOD_S = 1.0  # how often Serve polls each replica's record_routing_stats for the routers


def build_app(args: AppConfig) -> serve.Application:
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args)
    cache_dir = Path(config.model_cache_dir) if config.model_cache_dir else None
    # Opening the checkpoint here converts the bundled model once, with progress, before replicas start.
    checkpoint = open_checkpoint(config.model, cache_dir=cache_dir)
    model_config = ModelConfig.from_hf(checkpoint.hf_config)

    prefill = serve.deployment(PrefillReplica).options(
        name="PrefillWorker",
        ray_actor_options=_actor_options(config.prefill.resources.num_cpus, config.prefill.resources.num_gpus,
                                         config.prefill.resources.custom),
        max_ongoing_requests=config.prefill.max_ongoing_requests,
        autoscaling_config=_autoscaling(
            config.prefill.autoscaling,
            "mixquant_serve.autoscaling:PrefillAutoscalingPolicy",
            {"target_queued_tokens_per_replica": config.prefill.target_queued_tokens_per_replica},
        ),
        request_router_config=_session_router(config.router.max_queued_per_replica, config.router.saturated_kv_usage),
    )
    decode = serve.deployment(DecodeReplica).options(
        name="DecodeWorker",
        ray_actor_options=_actor_options(config.decode.resources.num_cpus, config.decode.resources.num_gpus,
                                         config.decode.resources.custom),
        max_ongoing_requests=config.decode.max_ongoing_requests,
        autoscaling_config=_autoscaling(
            config.decode.autoscaling,
            "mixquant_serve.autoscaling:DecodeAutoscalingPolicy",
            {
                "target_kv_usage": config.decode.target_kv_usage,
                "target_running_seqs_per_replica": config.decode.target_running_seqs_per_replica,
            },
        ),
        request_router_config=_session_router(config.router.max_queued_per_replica, config.router.saturated_kv_usage),
    )
    engine = config.decode.engine
    settings = ServerSettings(
        model_name=config.served_model_name or checkpoint.name.lower(),
        max_model_len=min(engine.max_model_len or model_config.max_position_embeddings, model_config.max_position_embeddings,
                      engine.num_kv_blocks * engine.block_size),
        max_tokens_cap=config.router.max_tokens_cap,
        max_body_bytes=config.router.max_body_bytes,
        vocab_size=model_config.vocab_size,
        max_prompt_tokens=config.router.max_prompt_tokens,
        api_keys=ApiKeySource(config.router.api_keys.keys_file, config.router.api_keys.keys_env_var)
        if config.router.api_keys is not None
        else None,
    )
    router = router_deployment().options(
        name="Router",
        num_replicas=config.router.num_replicas,
        ray_actor_options=_actor_options(config.router.num_cpus, 0.0),
    )
    tokenizer_factory = functools.partial(load_tokenizer, config.model, config.model_cache_dir)
    prefill_app = prefill.bind(config) if config.prefill.enabled else None  # None: co-located serving
    return router.bind(decode.bind(config, prefill_app), tokenizer_factory, settings, prefill_app)


def _actor_options(num_cpus: float, num_gpus: float, custom: dict[str, float] | None = None) -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if custom:
        options["resources"] = dict(custom)
    return options


def _autoscaling(bounds: Autoscaling, policy: str, policy_kwargs: dict[str, float]) -> dict[str, Any]:
    return {
        "min_replicas": bounds.min_replicas,
        "max_replicas": bounds.max_replicas,
        "initial_replicas": bounds.initial_replicas if bounds.initial_replicas is not None else bounds.min_replicas,
        "upscale_delay_s": bounds.upscale_delay_s,
        "downscale_delay_s": bounds.downscale_delay_s,
        "look_back_period_s": bounds.look_back_period_s,
        "metrics_interval_s": AUTOSCALING_METRICS_INTERVAL_S,
        "policy": {"policy_function": policy, "policy_kwargs": policy_kwargs},
    }


def _session_router(max_queued_per_replica: int, saturated_kv_usage: float) -> RequestRouterConfig:
    return RequestRouterConfig(
        request_router_class=SESSION_ROUTER,
        request_router_kwargs={
            "virtual_nodes": 64,
            "max_queue_len": max_queued_per_replica,
            "load_factor": 1.25,
            "saturated_kv_usage": saturated_kv_usage,
        },
        request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
    )


def wait_until_running(app_name: str, timeout_s: float, poll_s: float = 2.0) -> None:
    """Waits for a deployed Serve application to reach RUNNING. Raises RuntimeError with Serve's message if
    its deploy failed, or with each deployment's state if it is still not running after `timeout_s` (a
    replica that cannot be placed, e.g. asking for more GPUs than the cluster has, waits forever otherwise)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(app_name)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"application {app_name!r} failed to deploy: {status.message}")
        if time.monotonic() > deadline:
            states = {name: (d.status, d.message) for name, d in status.deployments.items()} if status else None
            raise RuntimeError(f"application {app_name!r} not running after {timeout_s:.0f} s: {states}")
        time.sleep(poll_s)
