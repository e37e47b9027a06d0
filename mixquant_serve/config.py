"""The application's arguments: what `serve_config.yaml` puts under `applications[].args`.

Every field is typed and described; unknown keys are errors (extra="forbid"), so a misspelt
setting fails at `serve run` instead of being ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mixquant_serve.engine.config import EngineConfig
from mixquant_serve.quant.precision import PrefillPrecisionChoice


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ActorResources(Strict):
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved by each replica of the pool (fractions allowed).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved by each replica (1 on GPU deployments; 0 on CPU).")
    custom: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources reserved by each replica, e.g. {prefill_node: 1}: with a node group that "
        "advertises the resource (ray start --resources), the pool lands only there (deploy/kuberay).",
    )


class Autoscaling(Strict):
    min_replicas: int = Field(1, ge=0, description="Fewest replicas the pool scales down to.")
    max_replicas: int = Field(1, ge=1, description="Most replicas the pool scales up to.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at start (default: min_replicas).")
    upscale_delay_s: float = Field(10.0, ge=0, description="Load must stay high this long before scaling up.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Load must stay low this long before scaling down.")
    look_back_period_s: float = Field(
        30.0, gt=0, description="Window over which each replica's load samples are averaged before the policy sees them."
    )

    @model_validator(mode="after")
    def _bounds(self) -> "Autoscaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie within [min_replicas, max_replicas]")
        return self


class PrefillPool(Strict):
    enabled: bool = Field(
        True,
        description="false: no prefill pool; each decode replica prefills every prompt itself in the decode precision "
        "(co-located serving, the baseline that disaggregation is measured against: benchmarks/agentic.py colocated-bf16).",
    )
    precision: PrefillPrecisionChoice = Field(
        "auto", description="Prefill matmul precision: auto (nvfp4 on sm_100+, fp8 on sm_89/90, nvfp4 emulated on CPU), nvfp4, fp8, bf16."
    )
    resources: ActorResources = Field(default_factory=ActorResources, description="Per-replica resources.")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling, description="Replica bounds of the prefill pool.")
    target_queued_tokens_per_replica: int = Field(
        8192, ge=1, description="Autoscaling target: prompt tokens waiting or in progress per prefill replica."
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="KV cache and batching of each replica.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica accepts before Serve queues them.")


class DecodePool(Strict):
    precision: Literal["bf16", "fp32"] = Field(
        "bf16",
        description="Decode precision: unquantized weights. bf16 computes in bf16 on GPU and in fp32 on CPU (no bf16 "
        "instructions there); fp32 is accepted on CPU only.",
    )
    local_prefill_tokens: int = Field(
        256,
        ge=0,
        description="Uncached prompt tokens (beyond the decode replica's prefix cache) up to which the decode replica "
        "prefills locally in its own precision instead of asking the prefill pool.",
    )
    kv_transfer_timeout_s: float = Field(30.0, gt=0, description="Longest wait for a KV pull before local fallback.")
    prefill_timeout_s: float = Field(120.0, gt=0, description="Longest wait for the prefill pool before local fallback.")
    transfer_fault_injection: bool = Field(
        False, description="Test deployments only: give each replica's KV transport an injector that tests arm through "
        "DecodeReplica.arm_transfer_fault (failures and delays inside the real transfer path). Off in production."
    )
    resources: ActorResources = Field(default_factory=ActorResources, description="Per-replica resources.")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling, description="Replica bounds of the decode pool.")
    target_kv_usage: float = Field(0.7, gt=0, le=1, description="Autoscaling target: fraction of KV blocks in use.")
    target_running_seqs_per_replica: int = Field(24, ge=1, description="Autoscaling target: running sequences.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="KV cache and batching of each replica.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica accepts before Serve queues them.")


class ApiKeys(Strict):
    """Where the Router reads its API keys (the keys themselves never appear in the config)."""

    keys_file: str | None = Field(
        None, description="Path, readable by every Router replica, of a file with one API key per line ('#' comments)."
    )
    keys_env_var: str | None = Field(
        None, description="Name of an environment variable of the Router replicas holding comma-separated API keys."
    )

    @model_validator(mode="after")
    def _one_source(self) -> "ApiKeys":
        if (self.keys_file is None) == (self.keys_env_var is None):
            raise ValueError("router.api_keys needs exactly one of keys_file and keys_env_var")
        return self


class RouterSettings(Strict):
    num_cpus: float = Field(0.1, ge=0, description="CPUs reserved by each router replica.")
    num_replicas: int = Field(1, ge=1, description="Router (HTTP ingress) replicas.")
    max_tokens_cap: int = Field(4096, ge=1, description="Largest max_tokens a request may ask for.")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest HTTP request body accepted (413 above).")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Longest prompt accepted, in tokens after the chat template (400 above; default: the "
        "context length less one)."
    )
    api_keys: ApiKeys | None = Field(
        None, description="Require 'Authorization: Bearer <key>' on every route but /health (401 otherwise); "
        "default: no authentication."
    )
    max_queued_per_replica: int = Field(
        16, ge=1, description="Session affinity gives way to the least-loaded replica past this many queued requests."
    )
    saturated_kv_usage: float = Field(
        0.95, gt=0, le=1, description="A replica reporting at least this KV-block use takes a session's request only "
        "when no other replica can (routing stats, polled every second)."
    )


class AppConfig(Strict):
    model: str = Field(
        "bundled:smollm2-135m-instruct",
        description="Model for both pools: bundled:smollm2-135m-instruct, a local Hugging Face folder, or synthetic:NAME.",
    )
    served_model_name: str | None = Field(None, description="Name in /v1/models and responses (default: from the model).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where replicas compute; auto: CUDA if present.")
    model_cache_dir: str | None = Field(None, description="Where converted models are cached (default ~/.cache/mixquant).")
    prefill: PrefillPool = Field(default_factory=PrefillPool, description="The quantized prefill pool.")
    decode: DecodePool = Field(default_factory=DecodePool, description="The precise decode pool.")
    router: RouterSettings = Field(default_factory=RouterSettings, description="The HTTP ingress.")

    @model_validator(mode="after")
    def _pools_agree(self) -> "AppConfig":
        if self.prefill.engine.block_size != self.decode.engine.block_size:
            raise ValueError(
                f"prefill.engine.block_size ({self.prefill.engine.block_size}) must equal decode.engine.block_size "
                f"({self.decode.engine.block_size}): KV blocks move between the pools one to one"
            )
        if self.device == "cpu" and (self.prefill.resources.num_gpus or self.decode.resources.num_gpus):
            raise ValueError("device is cpu but a pool asks for GPUs (resources.num_gpus > 0)")
        if self.device == "cuda" and self.decode.precision == "fp32":
            raise ValueError(
                "decode.precision fp32 is only valid on CPU: on GPU both pools keep a bf16 KV cache, and blocks move "
                "between them byte for byte"
            )
        return self
