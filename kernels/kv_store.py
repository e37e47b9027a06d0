"""Fused KV store: writes the new tokens' k and v into their paged-cache slots in one launch.

Reference: mixquant_serve.model.attention.store_kv (two indexed assignments, k then v). Cache layout
(mixquant_serve/engine/kv_cache.py), block-major:

    cache: [num_blocks, num_layers, 2 (k, v), block_size, kv_heads, head_dim]
    cache[slot_blocks[t], layer, 0, slot_offsets[t]] = k[t]      (and v[t] at index 1)

One program per token copies its k row and its v row ([kv_heads, head_dim] each, contiguous in the
cache) with one cast to the cache dtype; the copy is exact whenever the cache dtype can hold the
values (same dtype, or bf16/fp16 into fp32). A negative slot block marks a padding row (a CUDA-graph
batch padded up to a captured size): it is not stored.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_store_kernel(
    k_ptr,  # [tokens, kv_heads, head_dim]; unit stride along head_dim
    v_ptr,
    cache_ptr,  # [num_blocks, num_layers, 2, block_size, kv_heads, head_dim], contiguous
    slot_blocks_ptr,  # [tokens] int32/int64 block id, < 0: padding, not stored
    slot_offsets_ptr,  # [tokens] int32/int64 offset inside the block
    layer_offset,  # layer * cache.stride(1): elements to the layer inside a block
    stride_k_token,
    stride_k_head,
    stride_v_token,
    stride_v_head,
    stride_cache_block,
    stride_cache_kv,
    stride_cache_token,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,  # next power of two >= KV_HEADS
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_DIM
):
    token = tl.program_id(0).to(tl.int64)
    block = tl.load(slot_blocks_ptr + token).to(tl.int64)
    if block >= 0:
        offset = tl.load(slot_offsets_ptr + token).to(tl.int64)
        heads = tl.arange(0, BLOCK_H)
        dims = tl.arange(0, BLOCK_D)
        mask = (heads[:, None] < KV_HEADS) & (dims[None, :] < HEAD_DIM)
        # inside a (block, layer, kv, token) row, [kv_heads, head_dim] is contiguous
        row = heads[:, None] * HEAD_DIM + dims[None, :]
        k_cache = cache_ptr + block * stride_cache_block + layer_offset + offset * stride_cache_token
        k = tl.load(k_ptr + token * stride_k_token + heads[:, None] * stride_k_head + dims[None, :], mask=mask)
        v = tl.load(v_ptr + token * stride_v_token + heads[:, None] * stride_v_head + dims[None, :], mask=mask)
        tl.store(k_cache + row, k.to(cache_ptr.dtype.element_ty), mask=mask)
        tl.store(k_cache + stride_cache_kv + row, v.to(cache_ptr.dtype.element_ty), mask=mask)


def kv_store(
    k: torch.Tensor,
    v: torch.Tensor,
    cache: torch.Tensor,
    layer: int,
    slot_blocks: torch.Tensor,
    slot_offsets: torch.Tensor,
) -> None:
    """Stores k, v: [tokens, kv_heads, head_dim] at cache[slot_blocks, layer, 0/1, slot_offsets].

    cache: contiguous [num_blocks, num_layers, 2, block_size, kv_heads, head_dim] (fp32/bf16/fp16);
    k, v: float tensors with unit stride along head_dim; slot_blocks, slot_offsets: [tokens] int32 or
    int64 on the cache's device (a negative slot block skips the row). Bounds of the slot values are
    not checked on the device (that would cost a host sync): the caller owns the slot mapping.
    """
    if cache.dim() != 6 or not cache.is_contiguous():
        raise ValueError(f"cache must be a contiguous 6-D block-major tensor, got shape {tuple(cache.shape)} "
                         f"strides {cache.stride()}")
    if cache.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"cache must be float32, bfloat16 or float16, got {cache.dtype}")
    num_blocks, num_layers, two, block_size, kv_heads, head_dim = cache.shape
    if two != 2:
        raise ValueError(f"cache dim 2 must hold (k, v), got size {two}")
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer must be in [0, {num_layers}), got {layer}")
    tokens = k.shape[0]
    for name, t in (("k", k), ("v", v)):
        if t.shape != (tokens, kv_heads, head_dim):
            raise ValueError(f"{name} must have shape {(tokens, kv_heads, head_dim)}, got {tuple(t.shape)}")
        if t.stride(2) != 1 and head_dim > 1:
            raise ValueError(f"{name} must have unit stride along head_dim, got strides {t.stride()}")
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
        if t.device != cache.device:
            raise ValueError(f"{name} is on {t.device}, cache on {cache.device}")
    for name, t in (("slot_blocks", slot_blocks), ("slot_offsets", slot_offsets)):
        if (t.shape != (tokens,) or t.dtype not in (torch.int32, torch.int64) or t.device != cache.device
                or (tokens > 1 and t.stride(0) != 1)):
            raise ValueError(f"{name} must be a unit-stride [{tokens}] int32/int64 tensor on {cache.device}, "
                             f"got {tuple(t.shape)} {t.dtype} strides {t.stride()} on {t.device}")
    if tokens == 0:
        return
    _kv_store_kernel[(tokens,)](
        k, v, cache, slot_blocks, slot_offsets,
        layer * cache.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cache.stride(0), cache.stride(2), cache.stride(3),
        KV_HEADS=kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
