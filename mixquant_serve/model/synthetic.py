"""Synthetic checkpoints: real architectures with random weights, for speed benchmarks and fast tests.

`synthetic:<name>` gives the config.json of a published model (Hugging Face keys and values, as on the
hub) and weights drawn on the target device: normal(0, 0.02) for every linear and embedding, ones for
every RMSNorm weight. Speed does not depend on the values, but zeros would let a kernel skip work or
hide a NaN, so weights are never zero. A fixed seed makes two runs see the same numbers.

The parameter list mirrors what transformers builds for the config (`parameter_shapes`), name for
name and shape for shape: q/k/v biases for Qwen2 (or `attention_bias: true`), q_norm/k_norm of size
head_dim for Qwen3, no `lm_head.weight` when the embeddings are tied.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator

import torch

SYNTHETIC_SEED = 0
LINEAR_INIT_STD = 0.02

# https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json
LLAMA_3_1_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}

# https://huggingface.co/Qwen/Qwen3-8B/blob/main/config.json
QWEN3_8B: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# Tiny models for tests: tied embeddings (like SmolLM2) for Llama; untied and head_dim != hidden/heads
# (like Qwen3-0.6B) for Qwen3, so both layouts are exercised.
TINY_LLAMA: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 64,
    "intermediate_size": 128,
    "max_position_embeddings": 2048,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "vocab_size": 512,
}

TINY_QWEN3: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "hidden_size": 64,
    "intermediate_size": 128,
    "max_position_embeddings": 2048,
    "model_type": "qwen3",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "vocab_size": 512,
}

SYNTHETIC_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": LLAMA_3_1_8B,
    "qwen3-8b": QWEN3_8B,
    "tiny-llama": TINY_LLAMA,
    "tiny-qwen3": TINY_QWEN3,
}


def synthetic_config(name: str) -> dict[str, Any]:
    """A deep copy of the config.json of `synthetic:<name>` (callers may edit it freely)."""
    if name not in SYNTHETIC_CONFIGS:
        raise ValueError(f"synthetic model name {name!r} is unknown; known: {', '.join(SYNTHETIC_CONFIGS)}")
    return copy.deepcopy(SYNTHETIC_CONFIGS[name])


def parameter_shapes(hf_config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Hugging Face parameter names and shapes of a Llama/Mistral/Qwen2/Qwen3 causal LM, in model order."""
    model_type = hf_config["model_type"]
    hidden = int(hf_config["hidden_size"])
    intermediate = int(hf_config["intermediate_size"])
    vocab = int(hf_config["vocab_size"])
    num_heads = int(hf_config["num_attention_heads"])
    num_kv_heads = int(hf_config.get("num_key_value_heads") or num_heads)
    head_dim = int(hf_config.get("head_dim") or hidden // num_heads)
    # Qwen2 always has q/k/v biases; Llama and Qwen3 have them only with attention_bias=true.
    has_qkv_bias = model_type == "qwen2" or bool(hf_config.get("attention_bias", False))
    has_o_bias = model_type != "qwen2" and bool(hf_config.get("attention_bias", False))
    has_mlp_bias = bool(hf_config.get("mlp_bias", False))
    has_qk_norm = model_type == "qwen3"
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim

    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for layer in range(int(hf_config["num_hidden_layers"])):
        prefix = f"model.layers.{layer}"
        attention = [
            ("q_proj", q_size, hidden, has_qkv_bias),
            ("k_proj", kv_size, hidden, has_qkv_bias),
            ("v_proj", kv_size, hidden, has_qkv_bias),
            ("o_proj", hidden, q_size, has_o_bias),
        ]
        for proj, out_features, in_features, has_bias in attention:
            shapes.append((f"{prefix}.self_attn.{proj}.weight", (out_features, in_features)))
            if has_bias:
                shapes.append((f"{prefix}.self_attn.{proj}.bias", (out_features,)))
        if has_qk_norm:
            shapes.append((f"{prefix}.self_attn.q_norm.weight", (head_dim,)))
            shapes.append((f"{prefix}.self_attn.k_norm.weight", (head_dim,)))
        mlp = [
            ("gate_proj", intermediate, hidden),
            ("up_proj", intermediate, hidden),
            ("down_proj", hidden, intermediate),
        ]
        for proj, out_features, in_features in mlp:
            shapes.append((f"{prefix}.mlp.{proj}.weight", (out_features, in_features)))
            if has_mlp_bias:
                shapes.append((f"{prefix}.mlp.{proj}.bias", (out_features,)))
        shapes.append((f"{prefix}.input_layernorm.weight", (hidden,)))
        shapes.append((f"{prefix}.post_attention_layernorm.weight", (hidden,)))
    shapes.append(("model.norm.weight", (hidden,)))
    if not hf_config.get("tie_word_embeddings", False):
        shapes.append(("lm_head.weight", (vocab, hidden)))
    return shapes


def synthetic_weights(
    hf_config: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int = SYNTHETIC_SEED
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) drawn on `device` in `dtype`: ones for norm weights, normal(0, 0.02) otherwise.

    One generator on the target device, seeded once and consumed in model order, so the same
    (config, device, dtype, seed) always gives the same tensors, with no host-to-device copy.
    """
    device = torch.device(device)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    for name, shape in parameter_shapes(hf_config):
        if name.endswith("norm.weight"):  # input_layernorm, post_attention_layernorm, q_norm, k_norm, model.norm
            yield name, torch.ones(shape, device=device, dtype=dtype)
        else:
            tensor = torch.empty(shape, device=device, dtype=dtype)
            yield name, tensor.normal_(mean=0.0, std=LINEAR_INIT_STD, generator=generator)
