"""Engine factories for the workers: AppConfig in, engine + transport out (picklable via functools.partial)."""

from __future__ import annotations

from pathlib import Path

import torch

from mixquant_serve.config import AppConfig
from mixquant_serve.engine.decode_engine import DecodeEngine
from mixquant_serve.engine.prefill_engine import PrefillEngine
from mixquant_serve.model.loader import load_model
from mixquant_serve.quant.precision import default_compute_dtype, resolve_precision
from mixquant_serve.transfer.faults import ArmedFaults
from mixquant_serve.transfer.nixl import NixlTransport
from workers.decode import DecodeParts
from workers.prefill import PrefillParts


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was configured but this replica sees no GPU")
    return torch.device(choice)


def compute_dtype(config: AppConfig, device: torch.device) -> torch.dtype:
    """Both pools share one KV dtype (blocks move byte for byte): bf16 on GPU, fp32 on CPU."""
    return torch.float32 if config.decode.precision == "fp32" else default_compute_dtype(device)


def build_prefill_parts(config: AppConfig, agent_name: str) -> PrefillParts:
    device = resolve_device(config.device)
    precision = resolve_precision(config.prefill.precision, device)
    cache = Path(config.model_cache_dir) if config.model_cache_dir else None
    loaded = load_model(config.model, device, compute_dtype(config, device), {precision}, cache_dir=cache)
    return PrefillParts(PrefillEngine(loaded.model, config.prefill.engine, precision, device), NixlTransport(agent_name))


def build_decode_parts(config: AppConfig, agent_name: str) -> DecodeParts:
    device = resolve_device(config.device)
    cache = Path(config.model_cache_dir) if config.model_cache_dir else None
    loaded = load_model(config.model, device, compute_dtype(config, device), {"bf16"}, cache_dir=cache)
    engine = DecodeEngine(loaded.model, loaded.tokenizer, config.decode.engine, device, "bf16")
    faults = ArmedFaults() if config.decode.transfer_fault_injection else None
    return DecodeParts(engine, NixlTransport(agent_name, fault_injector=faults), faults)
