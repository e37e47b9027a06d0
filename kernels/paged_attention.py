"""Decode paged attention: one query token per sequence over its paged KV cache, GQA, split-K.

Reference: mixquant_serve.model.attention.decode_attention_reference. For sequence s and query head h
(kv head kh = h // GROUP, GROUP = heads // kv_heads), over the context positions t < context_lens[s]:

    k_t, v_t = cache[block_tables[s, t // block_size], layer, 0 / 1, t % block_size, kh]
    out[s, h] = sum_t softmax_t(scale * q[s, h] . k_t) v_t

Cache layout (mixquant_serve/engine/kv_cache.py): [num_blocks, num_layers, 2, block_size, kv_heads,
head_dim], contiguous; block_size need not be a power of two (each token's block is looked up).

One program per (sequence, kv head, split). It loads the GROUP query heads that share the kv head as
one [BLOCK_G >= 16, head_dim] tile, so each k/v tile is read once for the whole group and the scores
are a tensor-core product (tl.dot needs >= 16 rows; the padding rows are zero and never stored).
The context is cut into NUM_SPLITS contiguous ranges (split-K): with few sequences a single program
per kv head would leave most SMs idle while it walks a long context. Each program runs the online
softmax over its range in fp32 (log2 domain: the scale is folded with log2(e), exp2 is one
instruction): running max m, running sum l, unnormalised acc. With one split it divides and stores
the output; otherwise it stores (acc, m, l) and `_paged_attention_reduce_kernel` merges the splits:

    M = max_i m_i,  out = sum_i 2^(m_i - M) acc_i / sum_i 2^(m_i - M) l_i

Casts: scores and softmax in fp32; the probabilities are rounded to the cache dtype for the PV
product (as flash attention does; fp32 caches keep fp32 and use IEEE fp32 dots, not TF32). A
sequence with context_len 0 (a padding row of a CUDA-graph batch) gets zeros.

The number of splits is a launch argument, not derived from the context lengths on the device, so
a captured CUDA graph keeps working as contexts grow: each split covers ceil(context/NUM_SPLITS)
tokens rounded up to whole tiles, and a split past the end of a short context does nothing.
"""

import math

import torch
import triton
import triton.language as tl

MAX_SPLITS = 32
MIN_TOKENS_PER_SPLIT = 64  # below this a split's fixed cost (q load, partial store) dominates its reads
MIN_GROUP_ROWS = 16  # tl.dot's smallest M


@triton.jit
def _paged_attention_decode_kernel(
    q_ptr,  # [seqs, heads, head_dim]
    cache_ptr,  # [num_blocks, num_layers, 2, block_size, kv_heads, head_dim], contiguous
    block_tables_ptr,  # [seqs, max_blocks] int32
    context_lens_ptr,  # [seqs] int32
    out_ptr,  # [seqs, heads, head_dim] (NUM_SPLITS == 1)
    part_acc_ptr,  # [seqs, heads, NUM_SPLITS, HEAD_DIM] fp32 (NUM_SPLITS > 1)
    part_max_ptr,  # [seqs, heads, NUM_SPLITS] fp32, log2 domain
    part_sum_ptr,  # [seqs, heads, NUM_SPLITS] fp32
    layer_offset,  # layer * cache.stride(1)
    qk_scale,  # softmax scale * log2(e)
    stride_q_seq,
    stride_q_head,
    stride_out_seq,
    stride_out_head,
    stride_table_seq,
    stride_cache_block,
    stride_cache_kv,
    stride_cache_token,
    block_size,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,  # >= max(GROUP, 16), power of two
    BLOCK_D: tl.constexpr,  # >= max(HEAD_DIM, 16), power of two
    BLOCK_N: tl.constexpr,  # context tokens a loop step
    NUM_SPLITS: tl.constexpr,
    IEEE_DOT: tl.constexpr,  # fp32 cache: exact fp32 products instead of TF32
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    per_split = tl.cdiv(tl.cdiv(context_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, context_len)

    rows = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + rows
    row_mask = rows < GROUP
    dim_mask = dims < HEAD_DIM
    # q: [BLOCK_G, BLOCK_D], the group's query heads; padding rows are zero
    q = tl.load(q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :],
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    # kv heads are the innermost-but-one dim: head kh of a token row starts kh * HEAD_DIM elements in
    kv_base = cache_ptr + layer_offset + kv_head * HEAD_DIM
    table = block_tables_ptr + seq * stride_table_seq
    for tile in range(start, end, BLOCK_N):
        positions = tile + tl.arange(0, BLOCK_N)
        position_mask = positions < end
        block = tl.load(table + positions // block_size, mask=position_mask, other=0).to(tl.int64)
        token_rows = block * stride_cache_block + (positions % block_size) * stride_cache_token
        kv_mask = position_mask[:, None] & dim_mask[None, :]
        # k, v: [BLOCK_N, BLOCK_D]
        k = tl.load(kv_base + token_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(kv_base + stride_cache_kv + token_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        if IEEE_DOT:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        # scores: [BLOCK_G, BLOCK_N] fp32, log2 domain
        scores = tl.where(position_mask[None, :], scores * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # finite: the tile holds >= 1 position
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    store_mask = row_mask[:, None] & dim_mask[None, :]
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(out_ptr + seq * stride_out_seq + heads[:, None] * stride_out_head + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        part = (seq * NUM_HEADS + heads) * NUM_SPLITS + split  # [BLOCK_G]
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=store_mask)
        tl.store(part_max_ptr + part, m_i, mask=row_mask)
        tl.store(part_sum_ptr + part, l_i, mask=row_mask)


@triton.jit
def _paged_attention_reduce_kernel(
    out_ptr,  # [seqs, heads, head_dim]
    part_acc_ptr,  # [seqs, heads, NUM_SPLITS, HEAD_DIM] fp32
    part_max_ptr,  # [seqs, heads, NUM_SPLITS] fp32
    part_sum_ptr,  # [seqs, heads, NUM_SPLITS] fp32
    stride_out_seq,
    stride_out_head,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,  # next power of two >= NUM_SPLITS
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    split_mask = splits < NUM_SPLITS
    part = (seq * NUM_HEADS + head) * NUM_SPLITS + splits
    m = tl.load(part_max_ptr + part, mask=split_mask, other=float("-inf"))
    l = tl.load(part_sum_ptr + part, mask=split_mask, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty: weights 0, output 0
    weights = tl.exp2(m - m_max)  # empty splits (m = -inf) weigh 0
    total = tl.sum(l * weights, axis=0)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :],
                  mask=split_mask[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(acc * weights[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + seq * stride_out_seq + head * stride_out_head + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, num_sms: int) -> int:
    """How many context splits a decode launch uses: enough (sequence, kv head, split) programs to give
    every SM two, but no split shorter than MIN_TOKENS_PER_SPLIT tokens of the longest context, and at
    most MAX_SPLITS. A CUDA graph passes its longest possible context (it replays for any length)."""
    for name, value in (("num_seqs", num_seqs), ("num_kv_heads", num_kv_heads), ("num_sms", num_sms)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if max_context_len < 0:
        raise ValueError(f"max_context_len must be >= 0, got {max_context_len}")
    to_fill_sms = -(-2 * num_sms // (num_seqs * num_kv_heads))
    by_length = max(1, -(-max_context_len // MIN_TOKENS_PER_SPLIT))
    return max(1, min(MAX_SPLITS, to_fill_sms, by_length))


def paged_attention_decode(
    q: torch.Tensor,
    cache: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int,
) -> torch.Tensor:
    """q: [seqs, heads, head_dim] -> out: [seqs, heads, head_dim] in q's dtype.

    cache: contiguous [num_blocks, num_layers, 2, block_size, kv_heads, head_dim] of q's dtype
    (fp32, bf16 or fp16); heads a multiple of kv_heads. block_tables: [seqs, max_blocks] int32 with
    unit stride along blocks, covering each context; context_lens: [seqs] int32, each <= max_blocks *
    block_size (0 gives a zero row). Block ids and lengths are not bounds-checked on the device (no
    host sync): the caller owns them. num_splits in [1, MAX_SPLITS] (see decode_num_splits).
    """
    if q.dim() != 3 or (q.shape[2] > 1 and q.stride(2) != 1):
        raise ValueError(f"q must be [seqs, heads, head_dim] with unit stride along head_dim, got shape "
                         f"{tuple(q.shape)} strides {q.stride()}")
    if cache.dim() != 6 or not cache.is_contiguous() or cache.shape[2] != 2:
        raise ValueError(f"cache must be a contiguous [blocks, layers, 2, block_size, kv_heads, head_dim] tensor, "
                         f"got shape {tuple(cache.shape)} strides {cache.stride()}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or cache.dtype != q.dtype:
        raise ValueError(f"q and cache must share one dtype of float32/bfloat16/float16, got {q.dtype} and {cache.dtype}")
    if q.device != cache.device:
        raise ValueError(f"q is on {q.device}, cache on {cache.device}")
    _, num_layers, _, block_size, kv_heads, head_dim = cache.shape
    seqs, heads = q.shape[0], q.shape[1]
    if q.shape[2] != head_dim:
        raise ValueError(f"q's head_dim {q.shape[2]} != cache head_dim {head_dim}")
    if heads % kv_heads != 0:
        raise ValueError(f"q's heads ({heads}) must be a multiple of the cache's kv_heads ({kv_heads})")
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer must be in [0, {num_layers}), got {layer}")
    if (block_tables.dim() != 2 or block_tables.shape[0] != seqs or block_tables.dtype != torch.int32
            or block_tables.device != cache.device or (block_tables.shape[1] > 1 and block_tables.stride(1) != 1)):
        raise ValueError(f"block_tables must be [{seqs}, max_blocks] int32 on {cache.device} with unit stride along "
                         f"blocks, got {tuple(block_tables.shape)} {block_tables.dtype} strides {block_tables.stride()}")
    if (context_lens.shape != (seqs,) or context_lens.dtype != torch.int32 or context_lens.device != cache.device
            or (seqs > 1 and context_lens.stride(0) != 1)):
        raise ValueError(f"context_lens must be a unit-stride [{seqs}] int32 tensor on {cache.device}, got "
                         f"{tuple(context_lens.shape)} {context_lens.dtype} strides {context_lens.stride()}")
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if seqs == 0:
        return out
    group = heads // kv_heads
    block_d = max(MIN_GROUP_ROWS, triton.next_power_of_2(head_dim))
    meta = dict(
        NUM_HEADS=heads, GROUP=group, HEAD_DIM=head_dim,
        BLOCK_G=max(MIN_GROUP_ROWS, triton.next_power_of_2(group)), BLOCK_D=block_d,
        BLOCK_N=64 if block_d <= 128 else 32, NUM_SPLITS=num_splits, IEEE_DOT=q.dtype == torch.float32,
    )
    if num_splits > 1:
        part_acc = torch.empty(seqs, heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_max = torch.empty(seqs, heads, num_splits, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
    else:  # never read: the kernel stores the output directly
        part_acc = part_max = part_sum = out
    _paged_attention_decode_kernel[(seqs, kv_heads, num_splits)](
        q, cache, block_tables, context_lens, out, part_acc, part_max, part_sum,
        layer * cache.stride(1), scale * math.log2(math.e),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        cache.stride(0), cache.stride(2), cache.stride(3), block_size,
        num_warps=4, **meta,
    )
    if num_splits > 1:
        _paged_attention_reduce_kernel[(seqs, heads)](
            out, part_acc, part_max, part_sum, out.stride(0), out.stride(1),
            NUM_HEADS=heads, HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4,
        )
    return out
