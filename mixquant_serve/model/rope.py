"""Rotary position embedding (RoPE), Hugging Face convention (rotate-half, not interleaved).

cos/sin are computed from the absolute position of each token, so a token's rotation does not depend on
which batch or chunk it is computed in: the property that makes prefix-cached and transferred KV valid.
Scaling variants follow transformers' `modeling_rope_utils` (linear, llama3, yarn) exactly.

The model owns one RotaryEmbedding. Its table of cos and sin for every position below
max_position_embeddings is computed once (at init, again after the meta-device model is
materialized); a forward gathers its tokens' rows once (`RotaryEmbedding.forward`: one index_select,
graph-safe: it reads the positions on the device) and every layer rotates q and k with them:

    cos_sin[t] = [cos(p_t * inv_freq) * scaling, sin(p_t * inv_freq) * scaling]     fp32, [head_dim]
    x' = x * dtype(cat(cos, cos)) + cat(-x2, x1) * dtype(cat(sin, sin))              in x's dtype

On CUDA `apply_rotary` is one Triton launch a layer rotating q and k in place (kernels/rotary.py);
elsewhere `apply_rotary_reference`, the same ops as transformers' `apply_rotary_pos_emb`.
Positions must be below max_position_embeddings (the table's length).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mixquant_serve.model.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [head_dim/2] float32, attention scaling applied to cos and sin)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.kind == "default":
        return inv_freq, 1.0
    if rope.kind == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.kind == "llama3":
        old_context = rope.original_max_position_embeddings or max_position_embeddings
        low_wavelen = old_context / rope.low_freq_factor
        high_wavelen = old_context / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    if rope.kind == "yarn":
        return _yarn(rope, head_dim, max_position_embeddings)
    raise ValueError(f"unsupported rope kind {rope.kind!r}")


def _yarn(rope: RopeConfig, dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    original = rope.original_max_position_embeddings or max_position_embeddings
    factor = rope.factor
    attention = rope.attention_factor
    if attention is None:
        attention = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep, attention


def cos_sin_table(inv_freq: torch.Tensor, attention_scaling: float, num_positions: int) -> torch.Tensor:
    """[num_positions, head_dim] fp32: cos | sin of position * inv_freq, times the attention scaling, on
    inv_freq's device (the fp32 ops transformers' rotary embedding runs per forward, done once)."""
    positions = torch.arange(num_positions, device=inv_freq.device).to(torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # [num_positions, head_dim/2]
    return torch.cat((freqs.cos() * attention_scaling, freqs.sin() * attention_scaling), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, rope: RopeConfig, head_dim: int, max_position_embeddings: int):
        super().__init__()
        self._spec = (rope, head_dim, max_position_embeddings)
        inv_freq, self.attention_scaling = inverse_frequencies(rope, head_dim, max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos_sin_cache", cos_sin_table(inv_freq, self.attention_scaling, max_position_embeddings),
                             persistent=False)

    def reset_buffers(self, device: torch.device) -> None:
        """Recomputes inv_freq and the cos/sin table on `device` (after a model built on the meta device is
        materialized)."""
        self.inv_freq = inverse_frequencies(*self._spec)[0].to(device)
        self.cos_sin_cache = cos_sin_table(self.inv_freq, self.attention_scaling, self._spec[2])

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """positions: [tokens] int -> cos_sin: [tokens, head_dim] fp32 (cos half, then sin half)."""
        return self.cos_sin_cache.index_select(0, positions)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q: [tokens, heads, head_dim] and k: [tokens, kv_heads, head_dim] by cos_sin: [tokens, head_dim].

    On CUDA in place (one Triton launch; q and k may be strided views of the qkv projection's output)
    and returns q, k; elsewhere returns new tensors from apply_rotary_reference.
    """
    if q.is_cuda and q.dtype in (torch.float32, torch.bfloat16, torch.float16):
        # Imported here: Triton comes with CUDA builds of torch, not necessarily on CPU hosts.
        from kernels.rotary import rotary_inplace

        rotary_inplace(q, k, cos_sin)
        return q, k
    return apply_rotary_reference(q, k, cos_sin)


def apply_rotary_reference(q: torch.Tensor, k: torch.Tensor,
                           cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary kernel's reference: q, k [tokens, *, head_dim], cos_sin [tokens, head_dim] fp32 -> new q, k."""
    half = cos_sin.shape[-1] // 2
    cos, sin = cos_sin[:, :half], cos_sin[:, half:]
    cos = torch.cat((cos, cos), dim=-1).to(q.dtype)[:, None, :]  # [tokens, 1, head_dim]
    sin = torch.cat((sin, sin), dim=-1).to(q.dtype)[:, None, :]
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated_half * sin
