"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2), top down, with Hugging Face names.

    LlamaForCausalLM
      model.embed_tokens                      Embedding (never quantized)
      model.layers[i]                         DecoderLayer
        input_layernorm                       RMSNorm
        self_attn.{q,k,v,o}_proj              QuantLinear  (Qwen2: q/k/v biases)
        self_attn.{q,k}_norm                  RMSNorm per head (Qwen3 only)
        post_attention_layernorm              RMSNorm
        mlp.{gate,up,down}_proj               QuantLinear  (SwiGLU)
      model.norm                              RMSNorm
      lm_head                                 Linear (tied to embed_tokens when the config says so; never quantized)

Every forward takes the phase's `precision`: the same weights serve a quantized prefill ("nvfp4"/"fp8")
and a precise decode ("bf16"), and only the QuantLinear layers of the blocks look at it.
The batch is flat: tokens of several sequences concatenated, described by AttentionMetadata.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixquant_serve.model.attention import AttentionMetadata, paged_attention
from mixquant_serve.model.config import ModelConfig
from mixquant_serve.model.rope import RotaryEmbedding
from mixquant_serve.quant.linear import QuantLinear
from mixquant_serve.quant.precision import Precision


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 whatever the compute dtype, as the reference implementation does.
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, dtype: torch.dtype):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.scale = config.head_dim**-0.5
        hidden, bias = config.hidden_size, config.qkv_bias
        self.q_proj = QuantLinear(hidden, config.q_size, bias=bias, dtype=dtype)
        self.k_proj = QuantLinear(hidden, config.kv_size, bias=bias, dtype=dtype)
        self.v_proj = QuantLinear(hidden, config.kv_size, bias=bias, dtype=dtype)
        self.o_proj = QuantLinear(config.q_size, hidden, bias=False, dtype=dtype)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None
        self.rotary = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        precision: Precision,
    ) -> torch.Tensor:
        # x: [tokens, hidden]
        tokens = x.shape[0]
        q = self.q_proj(x, precision).view(tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x, precision).view(tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, precision).view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(q, k, positions)
        out = paged_attention(q, k, v, kv_cache, self.layer_index, meta, self.scale)  # [tokens, heads, head_dim]
        return self.o_proj(out.reshape(tokens, self.num_heads * self.head_dim), precision)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = QuantLinear(hidden, inner, dtype=dtype)
        self.up_proj = QuantLinear(hidden, inner, dtype=dtype)
        self.down_proj = QuantLinear(inner, hidden, dtype=dtype)

    def forward(self, x: torch.Tensor, precision: Precision) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x, precision)) * self.up_proj(x, precision), precision)


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
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        precision: Precision,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, kv_cache, meta, precision)
        return x + self.mlp(self.post_attention_layernorm(x), precision)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, i, dtype) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        precision: Precision,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [tokens, hidden]
        for layer in self.layers:
            x = layer(x, positions, kv_cache, meta, precision)
        return self.norm(x)


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
