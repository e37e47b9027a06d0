"""Paged attention over the block-major KV cache: the pure-torch reference used on CPU and by tests.

KV cache layout (one tensor per engine), block-major so that one block is one contiguous span across
all layers and a KV transfer is one descriptor per block:

    cache: [num_blocks, num_layers, 2 (k, v), block_size, num_kv_heads, head_dim]

Token t of a sequence lives in block `block_table[t // block_size]` at offset `t % block_size`.
A forward step processes a flat batch of tokens from several sequences; each sequence contributes
`query_len` new tokens at the end of a context of `context_len` tokens (cached prefix + new tokens).
Prefill (query_len == context_len), prefill after a cached prefix, and decode (query_len == 1) are all
the same case: token j of the query attends to context positions <= context_len - query_len + j.

Backends. On CUDA the k/v store is the fused Triton kernel (kernels/kv_store.py) and a decode step
(metadata carrying `DecodeTensors`: every sequence computes one token) runs the Triton paged-attention
kernel (kernels/paged_attention.py); other steps attend through SDPA per sequence. On CPU everything
is the torch code below. `store_kv_reference` and `decode_attention_reference` are the kernels'
references, which their tests and the benchmarks import.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class DecodeTensors:
    """A decode step on the device (one new token per sequence), as the paged-attention kernel reads it.

    The tensors are read on the device only, so a CUDA graph captured with one set replays correctly
    after their contents are overwritten for the next step.
    """

    block_tables: torch.Tensor  # [seqs, max_blocks] int32, each row covering its context
    context_lens: torch.Tensor  # [seqs] int32: tokens in cache after this step; 0 for a padding row
    num_splits: int  # context splits of the kernel (kernels.paged_attention.decode_num_splits)


def pack_block_tables(block_tables: list[list[int]], rows: int, width: int) -> torch.Tensor:
    """CPU int32 [rows, width]: each table left-aligned, zeros after it and in rows past the tables."""
    packed = np.zeros((rows, width), dtype=np.int32)
    for row, table in enumerate(block_tables):
        packed[row, : len(table)] = table
    return torch.from_numpy(packed)


def decode_tensors(
    block_tables: list[list[int]], context_lens: list[int], num_splits: int, device: torch.device
) -> DecodeTensors:
    """DecodeTensors of an eager decode step: the tables packed to the longest one, on device."""
    width = max(1, max(len(t) for t in block_tables))
    return DecodeTensors(
        block_tables=pack_block_tables(block_tables, len(block_tables), width).to(device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32).to(device),
        num_splits=num_splits,
    )


@dataclass
class AttentionMetadata:
    """Where each sequence's new tokens go and what they attend to. Built by the engine's runner.

    A negative slot block marks a padding row (a CUDA-graph batch padded up to a captured size):
    its k/v are not stored. `decode` is set for decode steps on CUDA (see DecodeTensors); for a
    captured graph the list fields describe the batch it was captured with, not the replayed ones.
    """

    query_lens: list[int]  # new tokens per sequence, in batch order
    context_lens: list[int]  # tokens in cache after this step, per sequence
    block_tables: list[list[int]]  # block ids per sequence, covering context_lens
    slot_blocks: torch.Tensor  # [tokens] int64: block id where each new token's k/v is stored
    slot_offsets: torch.Tensor  # [tokens] int64: offset inside that block
    block_size: int
    decode: DecodeTensors | None = None

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)


def store_kv_reference(
    cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, slot_blocks: torch.Tensor,
    slot_offsets: torch.Tensor,
) -> None:
    """cache[slot_blocks[t], layer, 0 / 1, slot_offsets[t]] = k[t] / v[t], skipping rows with a negative block.

    cache: [num_blocks, num_layers, 2, block_size, kv_heads, head_dim]; k, v: [tokens, kv_heads, head_dim].
    """
    keep = slot_blocks >= 0
    if not bool(keep.all()):
        k, v, slot_blocks, slot_offsets = k[keep], v[keep], slot_blocks[keep], slot_offsets[keep]
    cache[slot_blocks, layer, 0, slot_offsets] = k.to(cache.dtype)
    cache[slot_blocks, layer, 1, slot_offsets] = v.to(cache.dtype)


def store_kv(cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
    # cache: [num_blocks, num_layers, 2, block_size, kv_heads, head_dim]; k, v: [tokens, kv_heads, head_dim]
    if cache.is_cuda:
        # Imported here: Triton comes with CUDA builds of torch, not necessarily on CPU hosts.
        from kernels.kv_store import kv_store

        kv_store(k, v, cache, layer, meta.slot_blocks, meta.slot_offsets)
    else:
        store_kv_reference(cache, layer, k, v, meta.slot_blocks, meta.slot_offsets)


def decode_attention_reference(
    q: torch.Tensor,
    cache: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence over its paged context; the paged-attention kernel's reference.

    q: [seqs, heads, head_dim]; block_tables: [seqs, max_blocks]; context_lens: [seqs] -> out:
    [seqs, heads, head_dim] in q's dtype. Scores and softmax in fp32 (fp64 for fp64 input); a context
    of 0 gives zeros. GQA: query head h reads kv head h // (heads // kv_heads).
    """
    seqs, heads, head_dim = q.shape
    kv_heads = cache.shape[4]
    compute = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros(seqs, heads, head_dim, dtype=compute, device=q.device)
    tables = block_tables.tolist()
    for seq, context_len in enumerate(context_lens.tolist()):
        if context_len == 0:
            continue
        k, v = gather_kv(cache, layer, tables[seq], context_len)  # [context_len, kv_heads, head_dim]
        k = k.to(compute).repeat_interleave(heads // kv_heads, dim=1)  # [context_len, heads, head_dim]
        v = v.to(compute).repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("hd,thd->ht", q[seq].to(compute), k) * scale  # [heads, context_len]
        out[seq] = torch.einsum("ht,thd->hd", scores.softmax(dim=-1), v)
    return out.to(q.dtype)


def gather_kv(
    cache: torch.Tensor, layer: int, block_table: list[int], context_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns k, v: [context_len, kv_heads, head_dim] of one sequence, read through its block table."""
    num_blocks = -(-context_len // cache.shape[3])
    blocks = torch.tensor(block_table[:num_blocks], dtype=torch.long, device=cache.device)
    kv = cache[blocks, layer]  # [blocks, 2, block_size, kv_heads, head_dim]
    k = kv[:, 0].flatten(0, 1)[:context_len]
    v = kv[:, 1].flatten(0, 1)[:context_len]
    return k, v


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: torch.Tensor,
    layer: int,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Stores this step's k/v in the cache, then attends each sequence's queries over its whole context.

    q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim] -> out: [tokens, heads, head_dim].
    GQA: heads is a multiple of kv_heads; query head h reads kv head h // (heads // kv_heads).
    """
    store_kv(cache, layer, k, v, meta)
    if meta.decode is not None and q.is_cuda:
        from kernels.paged_attention import paged_attention_decode

        decode = meta.decode
        return paged_attention_decode(q, cache, layer, decode.block_tables, decode.context_lens, scale,
                                      decode.num_splits)
    out = torch.empty_like(q)
    start = 0
    for seq, (query_len, context_len) in enumerate(zip(meta.query_lens, meta.context_lens)):
        end = start + query_len
        if query_len == context_len:  # nothing cached before: attend over this step's own k/v
            seq_k, seq_v = k[start:end], v[start:end]
            mask = None
        else:
            seq_k, seq_v = gather_kv(cache, layer, meta.block_tables[seq], context_len)
            seq_k, seq_v = seq_k.to(q.dtype), seq_v.to(q.dtype)
            first_query_position = context_len - query_len
            query_positions = torch.arange(first_query_position, context_len, device=q.device)
            mask = torch.arange(context_len, device=q.device)[None, :] <= query_positions[:, None]
        # A leading batch dim of 1: with 3-D inputs CUDA SDPA falls back to its math kernel
        # (55 ms instead of 0.95 ms a layer at 8K tokens on an H200, and O(n^2) memory).
        seq_out = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1).unsqueeze(0),  # [1, heads, query_len, head_dim]
            seq_k.transpose(0, 1).unsqueeze(0),  # [1, kv_heads, context_len, head_dim]
            seq_v.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=True,
        )
        out[start:end] = seq_out[0].transpose(0, 1)
        start = end
    return out
