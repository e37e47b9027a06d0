"""Builds a LlamaForCausalLM from a checkpoint source: Hugging Face names map onto the model's parameters,
one to one except the fused projections (llama.FUSED_PROJECTIONS), whose checkpoint tensors fill row
blocks of one weight."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from mixquant_serve.model.checkpoint import open_checkpoint
from mixquant_serve.model.config import ModelConfig
from mixquant_serve.model.llama import FUSED_PROJECTIONS, LlamaForCausalLM
from mixquant_serve.model.rope import RotaryEmbedding
from mixquant_serve.model.tokenizer import Tokenizer
from mixquant_serve.quant.linear import QuantLinear
from mixquant_serve.quant.precision import Precision


@dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: Tokenizer | None  # None for synthetic models
    load_seconds: float


def load_model(
    source: str,
    device: torch.device,
    dtype: torch.dtype,
    precisions: Iterable[Precision],
    cache_dir: Path | None = None,
    progress: bool = True,
) -> LoadedModel:
    """Loads weights, then quantizes each block linear once for every precision this process will run.

    `precisions` lists the phases' precisions (e.g. {"nvfp4"} on a prefill replica, {"bf16"} on a decode
    replica, both for a single-process pipeline). A linear keeps its dense weight only if "bf16" is listed.
    """
    started = time.perf_counter()
    checkpoint = open_checkpoint(source, cache_dir=cache_dir, progress=progress)
    config = ModelConfig.from_hf(checkpoint.hf_config)
    with torch.device("meta"):
        model = LlamaForCausalLM(config, dtype)
    model = model.to_empty(device=device)
    model.tie_weights()
    _load_weights(model, checkpoint.weights(device, dtype))
    for module in model.modules():  # buffers built on meta (rope frequencies) are recomputed on the device
        if isinstance(module, RotaryEmbedding):
            module.reset_buffers(device)
    wanted = sorted(set(precisions))
    for linear in model.quant_linears():
        linear.prepare(wanted)
    model.eval().requires_grad_(False)
    tokenizer = Tokenizer(checkpoint.tokenizer_dir) if checkpoint.tokenizer_dir is not None else None
    return LoadedModel(checkpoint.name, config, model, tokenizer, time.perf_counter() - started)


def checkpoint_targets(model: LlamaForCausalLM) -> dict[str, tuple[torch.nn.Parameter, slice | None]]:
    """Every checkpoint tensor name the model takes -> (its parameter, the rows it fills or None for all).

    A fused projection "model.layers.3.self_attn.qkv_proj.weight" is filled by
    "model.layers.3.self_attn.{q,k,v}_proj.weight", each into its part's rows (biases likewise).
    The tied lm_head shares embed_tokens' parameter and is listed once (named_parameters dedups it).
    """
    modules = dict(model.named_modules())
    targets: dict[str, tuple[torch.nn.Parameter, slice | None]] = {}
    for name, param in model.named_parameters():
        module_name, _, leaf = name.rpartition(".")
        module = modules[module_name]
        fused = next((f for f in FUSED_PROJECTIONS if module_name.endswith("." + f)), None)
        if fused is None or not isinstance(module, QuantLinear):
            targets[name] = (param, None)
            continue
        layer_prefix = module_name[: -len(fused)]
        for index, checkpoint_module in enumerate(FUSED_PROJECTIONS[fused]):
            targets[f"{layer_prefix}{checkpoint_module}.{leaf}"] = (param, module.part_rows(index))
    return targets


def _load_weights(model: LlamaForCausalLM, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    targets = checkpoint_targets(model)
    missing = set(targets)
    for name, tensor in weights:
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if name not in targets:
            raise ValueError(f"checkpoint tensor {name!r} has no place in the {model.config.model_type} architecture")
        param, rows = targets[name]
        destination = param if rows is None else param[rows]
        if tuple(tensor.shape) != tuple(destination.shape):
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                             f"{tuple(destination.shape)}")
        with torch.no_grad():
            destination.copy_(tensor)
        missing.discard(name)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
