"""Builds engines from a model source: one loaded model can serve both phases in one process."""

from __future__ import annotations

from pathlib import Path

import torch

from mixquant_serve.engine.config import EngineConfig
from mixquant_serve.engine.decode_engine import DecodeEngine
from mixquant_serve.engine.pipeline import LocalPipeline
from mixquant_serve.engine.prefill_engine import PrefillEngine
from mixquant_serve.model.loader import LoadedModel, load_model
from mixquant_serve.quant.precision import PrefillPrecisionChoice, default_compute_dtype, resolve_precision
from mixquant_serve.transfer.inprocess import InProcessHub, InProcessTransport


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def build_local_pipeline(
    model: str,
    prefill_precision: PrefillPrecisionChoice = "auto",
    device: torch.device | None = None,
    engine_config: EngineConfig | None = None,
    local_prefill_tokens: int = 0,
    cache_dir: Path | None = None,
    loaded: LoadedModel | None = None,
) -> tuple[LocalPipeline, LoadedModel]:
    """Prefill engine (quantized) + decode engine (precise) sharing one set of weights, KV handed off in-process.

    local_prefill_tokens=0 sends every prompt with at least one uncached token before the last through the
    prefill engine, which is what makes the quantized path observable from the command line.
    """
    device = device or default_device()
    precision = resolve_precision(prefill_precision, device)
    if loaded is None:
        loaded = load_model(model, device, default_compute_dtype(device), {precision, "bf16"}, cache_dir=cache_dir)
    config = engine_config or EngineConfig()
    hub = InProcessHub()
    pipeline = LocalPipeline(
        PrefillEngine(loaded.model, config, precision, device),
        DecodeEngine(loaded.model, loaded.tokenizer, config, device, "bf16"),
        InProcessTransport("prefill", hub),
        InProcessTransport("decode", hub),
        local_prefill_tokens,
    )
    return pipeline, loaded
