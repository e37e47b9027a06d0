"""Rotary position embedding applied to q and k in place: one launch a layer.

Reference: mixquant_serve.model.rope.apply_rotary_reference (transformers' rotate-half convention).
cos_sin holds each token's row of the model's precomputed table (model/rope.py): cos of the first
half of the frequencies, then sin, fp32, attention scaling included. With h = head_dim / 2, for
every head of q and of k:

    c, s = dtype(cos_sin[t, :h]), dtype(cos_sin[t, h:])      the reference casts cos/sin to x's dtype
    x1', x2' = dtype(dtype(x1 * c) - dtype(x2 * s)), dtype(dtype(x2 * c) + dtype(x1 * s))

Each product and the sum are rounded to x's dtype as the unfused torch ops round them (a bf16
product of two bf16 values is exact in fp32, so the one rounding matches torch's), which makes the
kernel bit-exact with the reference for bf16/fp16 on the GPU; fp32 is computed without FMA
contraction (`enable_fp_fusion=False`) so that it is bit-exact too. The Triton interpreter rounds
fp32 -> bf16 by truncation, so bf16 is checked on the GPU only.

One program per token rotates its q heads and k heads; q and k may be strided views (the split
output of the fused qkv projection) as long as head_dim is the unit-stride dimension.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(row_ptr, stride_head, c, s, NUM_HEADS, HALF, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotates the [NUM_HEADS, 2 * HALF] heads at row_ptr in place; c, s: fp32 [1, BLOCK_HALF], rounded to x's dtype."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HALF)
    first = row_ptr + heads * stride_head + dims
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    out1 = ((a1 * c).to(dtype).to(tl.float32) - (a2 * s).to(dtype).to(tl.float32)).to(dtype)
    out2 = ((a2 * c).to(dtype).to(tl.float32) + (a1 * s).to(dtype).to(tl.float32)).to(dtype)
    tl.store(first, out1, mask=mask)
    tl.store(first + HALF, out2, mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,  # [tokens, heads, head_dim], unit stride along head_dim
    k_ptr,  # [tokens, kv_heads, head_dim], q's dtype
    cos_sin_ptr,  # [tokens, head_dim] fp32, contiguous: cos | sin
    stride_q_token,
    stride_q_head,
    stride_k_token,
    stride_k_head,
    NUM_HEADS,
    NUM_KV_HEADS,
    HALF,  # head_dim / 2
    BLOCK_H: tl.constexpr,  # power of two >= heads
    BLOCK_KV_H: tl.constexpr,  # power of two >= kv_heads
    BLOCK_HALF: tl.constexpr,  # power of two >= HALF
):
    token = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    table_row = cos_sin_ptr + token * (2 * HALF)
    c = tl.load(table_row + dims, mask=dims < HALF, other=0.0)
    s = tl.load(table_row + HALF + dims, mask=dims < HALF, other=0.0)
    dtype = q_ptr.dtype.element_ty
    c, s = c.to(dtype).to(tl.float32), s.to(dtype).to(tl.float32)
    _rotate_heads(q_ptr + token * stride_q_token, stride_q_head, c, s, NUM_HEADS, HALF, BLOCK_H, BLOCK_HALF)
    _rotate_heads(k_ptr + token * stride_k_token, stride_k_head, c, s, NUM_KV_HEADS, HALF, BLOCK_KV_H, BLOCK_HALF)


def rotary_inplace(q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Rotates q: [tokens, heads, head_dim] and k: [tokens, kv_heads, head_dim] in place by cos_sin:
    [tokens, head_dim] fp32 (cos | sin). q and k: fp32/bf16/fp16, the same dtype, unit stride along head_dim."""
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must be 3-D [tokens, heads, head_dim], got {tuple(q.shape)} and {tuple(k.shape)}")
    tokens, heads, head_dim = q.shape
    if k.shape[0] != tokens or k.shape[2] != head_dim:
        raise ValueError(f"k must have shape ({tokens}, kv_heads, {head_dim}), got {tuple(k.shape)}")
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or k.dtype != q.dtype:
        raise ValueError(f"q and k must share a float32/bfloat16/float16 dtype, got {q.dtype} and {k.dtype}")
    for name, t in (("q", q), ("k", k)):
        if t.stride(2) != 1:
            raise ValueError(f"{name} must have unit stride along head_dim, got strides {t.stride()}")
        if t.device != cos_sin.device:
            raise ValueError(f"{name} is on {t.device}, cos_sin on {cos_sin.device}")
    if cos_sin.shape != (tokens, head_dim) or cos_sin.dtype != torch.float32 or not cos_sin.is_contiguous():
        raise ValueError(f"cos_sin must be a contiguous float32 tensor of shape ({tokens}, {head_dim}), got "
                         f"{cos_sin.dtype} {tuple(cos_sin.shape)} strides {cos_sin.stride()}")
    if tokens == 0:
        return
    half = head_dim // 2
    block_h = triton.next_power_of_2(max(heads, 1))
    block_half = triton.next_power_of_2(half)
    _rotary_kernel[(tokens,)](
        q, k, cos_sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), heads, k.shape[1], half,
        BLOCK_H=block_h, BLOCK_KV_H=triton.next_power_of_2(max(k.shape[1], 1)), BLOCK_HALF=block_half,
        num_warps=max(1, min(8, block_h * block_half // 512)), enable_fp_fusion=False,
    )
