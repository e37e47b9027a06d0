"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2), top down, with Hugging Face names.

    LlamaForCausalLM
      model.embed_tokens                      Embedding (never quantized)
      model.rotary_emb                        RotaryEmbedding: cos/sin table, gathered once a forward
      model.layers[i]                         DecoderLayer
        input_layernorm                       RMSNorm
        self_attn.qkv_proj                    QuantLinear, checkpoint's q_proj, k_proj, v_proj stacked (Qwen2: biases)
        self_attn.o_proj                      QuantLinear
        self_attn.{q,k}_norm                  RMSNorm per head (Qwen3 only)
        post_attention_layernorm              RMSNorm
        mlp.gate_up_proj                      QuantLinear, checkpoint's gate_proj, up_proj stacked (SwiGLU)
        mlp.down_proj                         QuantLinear
      model.norm                              RMSNorm
      lm_head                                 Linear (tied to embed_tokens when the config says so; never quantized)

Every forward takes the phase's `precision`: the same weights serve a quantized prefill ("nvfp4"/"fp8")
and a precise decode ("bf16"), and only the QuantLinear layers of the blocks and what feeds them look
at it. Names are Hugging Face's except the two fused projections (one GEMM each instead of three and
two); FUSED_PROJECTIONS tells the loader which checkpoint tensors fill which rows of them. The input
norms and SwiGLU's product hand their output to the next linear already quantized for the precision
(quant/activation.py: one fused kernel on CUDA instead of writing bf16 and reading it back).
The batch is flat: tokens of several sequences concatenated, described by AttentionMetadata.

The residual stream is carried as (x, delta): a layer returns its MLP output as the pending update
`delta` instead of adding it, and the next norm adds it (x + delta, then RMSNorm: one kernel on CUDA,
quant/activation.py); the final norm adds the last one. The sums are the unfused model's, rounded the
same way. q and k are rotated in place by one kernel a layer from the cos/sin rows gathered once per
forward (model/rope.py).
"""

from __future__ import annotations

import torch
from torch import nn

from mixquant_serve.model.attention import AttentionMetadata, paged_attention
from mixquant_serve.model.config import ModelConfig
from mixquant_serve.model.rope import RotaryEmbedding, apply_rotary
from mixquant_serve.quant.activation import (add_rms_norm_for_linear, rms_norm, rms_norm_for_linear,
                                             silu_mul_for_linear)
from mixquant_serve.quant.linear import LinearInput, QuantLinear
from mixquant_serve.quant.precision import Precision

# Fused projection (path inside a decoder layer) -> the checkpoint tensors stacked in it, in row order.
FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 whatever the compute dtype, as the reference implementation does.
        return rms_norm(x, self.weight, self.eps)

    def for_linear(self, x: torch.Tensor, precision: Precision) -> LinearInput:
        """x: [tokens, hidden] normalized, handed over in the input format of a linear running precision."""
        return rms_norm_for_linear(x, self.weight, self.eps, precision)

    def add_for_linear(self, x: torch.Tensor, delta: torch.Tensor, precision: Precision) -> tuple[torch.Tensor,
                                                                                                    LinearInput]:
        """x, delta: [tokens, hidden] -> (x + delta, that sum normalized in the input format of precision)."""
        return add_rms_norm_for_linear(x, delta, self.weight, self.eps, precision)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, dtype: torch.dtype):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.scale = config.head_dim**-0.5
        hidden, bias = config.hidden_size, config.qkv_bias
        self.qkv_sizes = (config.q_size, config.kv_size, config.kv_size)
        self.qkv_proj = QuantLinear(hidden, sum(self.qkv_sizes), bias=bias, dtype=dtype, parts=self.qkv_sizes)
        self.o_proj = QuantLinear(config.q_size, hidden, bias=False, dtype=dtype)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: LinearInput,
        cos_sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        precision: Precision,
    ) -> torch.Tensor:
        # x: [tokens, hidden] (normalized; already quantized for a quantized precision)
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x, precision).split(self.qkv_sizes, dim=-1)  # views of [tokens, q + 2 kv]
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, k, cos_sin)  # cos_sin: [tokens, head_dim] fp32
        out = paged_attention(q, k, v, kv_cache, self.layer_index, meta, self.scale)  # [tokens, heads, head_dim]
        return self.o_proj(out.reshape(tokens, self.num_heads * self.head_dim), precision)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_up_proj = QuantLinear(hidden, 2 * inner, dtype=dtype, parts=(inner, inner))
        self.down_proj = QuantLinear(inner, hidden, dtype=dtype)

    def forward(self, x: LinearInput, precision: Precision) -> torch.Tensor:
        # x: [tokens, hidden] (normalized; already quantized for a quantized precision)
        gate_up = self.gate_up_proj(x, precision)  # [tokens, 2 * inner]: gate, then up
        return self.down_proj(silu_mul_for_linear(gate_up, precision), precision)  # SiLU(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, layer_index, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, dtype)

    def forward(
        self,
        x: torch.Tensor,
        delta: torch.Tensor | None,
        cos_sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        precision: Precision,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [tokens, hidden], the residual stream before the previous layer's pending update delta (None
        # for the first layer) -> (the stream before this layer's update, this layer's MLP output)
        if delta is None:
            normalized = self.input_layernorm.for_linear(x, precision)
        else:
            x, normalized = self.input_layernorm.add_for_linear(x, delta, precision)
        attention = self.self_attn(normalized, cos_sin, kv_cache, meta, precision)
        x, normalized = self.post_attention_layernorm.add_for_linear(x, attention, precision)
        return x, self.mlp(normalized, precision)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, i, dtype) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.rotary_emb = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        precision: Precision,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [tokens, hidden]
        cos_sin = self.rotary_emb(positions)  # [tokens, head_dim] fp32, shared by every layer
        delta = None
        for layer in self.layers:
            x, delta = layer(x, delta, cos_sin, kv_cache, meta, precision)
        if delta is None:  # a model without layers
            return self.norm.for_linear(x, "bf16")
        return self.norm.add_for_linear(x, delta, "bf16")[1]


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.model = LlamaModel(config, dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Shares lm_head's weight with the embeddings when tied (again after moving off the meta device)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        precision: Precision,
    ) -> torch.Tensor:
        """input_ids, positions: [tokens] -> hidden states [tokens, hidden]; writes each token's k/v to kv_cache."""
        return self.model(input_ids, positions, kv_cache, meta, precision)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [sequences, hidden] -> logits: [sequences, vocab] in fp32 for sampling
        return self.lm_head(hidden).to(torch.float32)

    def quant_linears(self) -> list[QuantLinear]:
        return [m for m in self.modules() if isinstance(m, QuantLinear)]
