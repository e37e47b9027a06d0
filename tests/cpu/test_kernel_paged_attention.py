"""Decode paged attention: the Triton kernel under the Triton interpreter (CPU) against
decode_attention_reference, the reference against a naive per-head loop and against the engine's
SDPA path, and the launcher's argument checks and split policy.

The kernel runs in a child Python with TRITON_INTERPRET=1 (see test_kernel_nvfp4_quantize.py for
why). The interpreter computes bf16 wrongly (numpy has no bf16), so it checks fp32 and fp16; bf16
runs in tests/gpu/test_paged_attention.py.
"""

import pytest
import torch

from mixquant_serve.model.attention import AttentionMetadata, decode_attention_reference, paged_attention
from tests.interpret import run_interpreted


INTERPRETED_CHECK = r"""
import torch
from kernels.paged_attention import paged_attention_decode
from mixquant_serve.model.attention import decode_attention_reference

TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3}


def case(name, g, dtype, heads, kv_heads, head_dim, block_size, context_lens, num_splits, q_row_pad=0, table_pad=0):
    num_blocks, layers = 80, 3
    cache = torch.randn(num_blocks, layers, 2, block_size, kv_heads, head_dim, generator=g).to(dtype)
    seqs = len(context_lens)
    width = max(1, max(-(-c // block_size) for c in context_lens))
    # each sequence's blocks scattered over the cache; rows strided when table_pad > 0
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:width + table_pad] for _ in range(seqs)])
    tables = tables.to(torch.int32)[:, :width]
    # q rows strided when q_row_pad > 0 (unit stride along head_dim only)
    q = torch.randn(seqs, heads, head_dim + q_row_pad, generator=g).to(dtype)[:, :, :head_dim]
    lens = torch.tensor(context_lens, dtype=torch.int32)
    scale = head_dim ** -0.5
    out = paged_attention_decode(q, cache, 1, tables, lens, scale, num_splits)
    expected = decode_attention_reference(q, cache, 1, tables, lens, scale)
    error = (out.float() - expected.float()).abs()
    if out.shape != expected.shape or out.dtype != dtype:
        return f"{name}: got {tuple(out.shape)} {out.dtype}"
    if not error.max() <= TOLERANCE[dtype]:
        bad = (error > TOLERANCE[dtype]).nonzero()[:6].tolist()
        return f"{name}: max error {error.max().item():.3g} at (seq, head, dim) {bad}"
    return None


g = torch.Generator().manual_seed(0)
cases = [
    # name, dtype, heads, kv_heads, head_dim, block_size, context lens, splits, q_row_pad, table_pad
    ("MHA fp32 one split", torch.float32, 4, 4, 32, 16, [1, 16, 17, 100], 1, 0, 0),
    ("GQA 4 fp32 block 5, 3 splits", torch.float32, 8, 2, 32, 5, [37, 130, 2], 3, 0, 0),
    ("GQA 3 head_dim 20 strided q and tables", torch.float32, 6, 2, 20, 7, [50, 9], 2, 12, 5),
    ("more splits than tiles, empty context", torch.float32, 4, 1, 16, 16, [0, 3, 200], 7, 0, 0),
    ("fp16 GQA 8 block 16, 4 splits", torch.float16, 8, 1, 64, 16, [257, 64], 4, 0, 0),
    ("fp16 one split long", torch.float16, 4, 2, 32, 3, [190], 1, 0, 0),
]
failures = [message for name, *args in cases if (message := case(name, g, *args))]
print("\n".join(failures) if failures else "all cases match")
raise SystemExit(1 if failures else 0)
"""


def test_kernel_matches_reference_under_interpreter() -> None:
    stdout = run_interpreted(INTERPRETED_CHECK)
    assert "all cases match" in stdout, stdout[-4000:]


def random_cache(g: torch.Generator, blocks: int, layers: int, block_size: int, kv_heads: int, head_dim: int):
    return torch.randn(blocks, layers, 2, block_size, kv_heads, head_dim, generator=g, dtype=torch.float64)


def test_reference_matches_naive_attention() -> None:
    """Against softmax(q.k * scale) v written out head by head, token by token, in float64."""
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, head_dim, block_size = 6, 2, 8, 3
    cache = random_cache(g, 20, 2, block_size, kv_heads, head_dim)
    context_lens = [7, 1, 0, 12]
    tables = [torch.randperm(20, generator=g)[:4].tolist() for _ in context_lens]
    q = torch.randn(len(context_lens), heads, head_dim, generator=g, dtype=torch.float64)
    scale = 0.37
    out = decode_attention_reference(q, cache, 1, torch.tensor(tables), torch.tensor(context_lens), scale)
    for seq, context_len in enumerate(context_lens):
        for head in range(heads):
            kv_head = head // (heads // kv_heads)
            keys = [cache[tables[seq][t // block_size], 1, 0, t % block_size, kv_head] for t in range(context_len)]
            values = [cache[tables[seq][t // block_size], 1, 1, t % block_size, kv_head] for t in range(context_len)]
            if not keys:
                assert torch.equal(out[seq, head], torch.zeros(head_dim, dtype=torch.float64))
                continue
            weights = torch.softmax(torch.stack([scale * (q[seq, head] @ k) for k in keys]), dim=0)
            expected = sum(w * v for w, v in zip(weights, values))
            torch.testing.assert_close(out[seq, head], expected, rtol=1e-6, atol=1e-9)


def test_reference_matches_engine_sdpa_path() -> None:
    """A decode step through paged_attention (store + SDPA on CPU) equals store + the decode reference."""
    g = torch.Generator().manual_seed(2)
    heads, kv_heads, head_dim, block_size = 4, 2, 16, 4
    cache = random_cache(g, 12, 2, block_size, kv_heads, head_dim).float()
    context_lens = [5, 9, 1]
    tables = [[3, 7], [0, 1, 2], [11]]
    q = torch.randn(3, heads, head_dim, generator=g)
    k = torch.randn(3, kv_heads, head_dim, generator=g)
    v = torch.randn(3, kv_heads, head_dim, generator=g)
    last = [c - 1 for c in context_lens]
    meta = AttentionMetadata(
        query_lens=[1, 1, 1], context_lens=context_lens, block_tables=tables,
        slot_blocks=torch.tensor([t[p // block_size] for t, p in zip(tables, last)]),
        slot_offsets=torch.tensor([p % block_size for p in last]), block_size=block_size,
    )
    out = paged_attention(q, k, v, cache, 1, meta, 0.25)  # also stores k, v
    packed = torch.tensor([t + [0] * (3 - len(t)) for t in tables])
    expected = decode_attention_reference(q, cache, 1, packed, torch.tensor(context_lens), 0.25)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_launcher_rejects_bad_arguments() -> None:
    pytest.importorskip("triton")
    from kernels.paged_attention import MAX_SPLITS, paged_attention_decode

    cache = torch.zeros(4, 2, 2, 16, 2, 32)
    q = torch.zeros(3, 4, 32)
    tables = torch.zeros(3, 2, dtype=torch.int32)
    lens = torch.ones(3, dtype=torch.int32)
    with pytest.raises(ValueError, match="q must be"):
        paged_attention_decode(q.transpose(1, 2), cache, 0, tables, lens, 1.0, 1)
    with pytest.raises(ValueError, match="cache must be"):
        paged_attention_decode(q, cache.transpose(3, 4), 0, tables, lens, 1.0, 1)
    with pytest.raises(ValueError, match="share one dtype"):
        paged_attention_decode(q.half(), cache, 0, tables, lens, 1.0, 1)
    with pytest.raises(ValueError, match="multiple of the cache's kv_heads"):
        paged_attention_decode(torch.zeros(3, 3, 32), cache, 0, tables, lens, 1.0, 1)
    with pytest.raises(ValueError, match="head_dim"):
        paged_attention_decode(torch.zeros(3, 4, 16), cache, 0, tables, lens, 1.0, 1)
    with pytest.raises(ValueError, match="layer"):
        paged_attention_decode(q, cache, 2, tables, lens, 1.0, 1)
    with pytest.raises(ValueError, match="block_tables"):
        paged_attention_decode(q, cache, 0, tables.long(), lens, 1.0, 1)
    with pytest.raises(ValueError, match="block_tables"):
        paged_attention_decode(q, cache, 0, tables[:2], lens, 1.0, 1)
    with pytest.raises(ValueError, match="context_lens"):
        paged_attention_decode(q, cache, 0, tables, lens.long(), 1.0, 1)
    with pytest.raises(ValueError, match="num_splits"):
        paged_attention_decode(q, cache, 0, tables, lens, 1.0, MAX_SPLITS + 1)
    with pytest.raises(ValueError, match="num_splits"):
        paged_attention_decode(q, cache, 0, tables, lens, 1.0, 0)


def test_split_policy() -> None:
    pytest.importorskip("triton")
    from kernels.paged_attention import MAX_SPLITS, MIN_TOKENS_PER_SPLIT, decode_num_splits

    # one sequence of a long context on 132 SMs: capped at MAX_SPLITS
    assert decode_num_splits(1, 8, 8192, 132) == MAX_SPLITS
    # short context: no split shorter than MIN_TOKENS_PER_SPLIT
    assert decode_num_splits(1, 8, 3 * MIN_TOKENS_PER_SPLIT, 132) == 3
    assert decode_num_splits(1, 8, 0, 132) == 1
    # enough (sequence, kv head) programs to fill the SMs twice: no split
    assert decode_num_splits(128, 8, 8192, 132) == 1
    assert decode_num_splits(8, 8, 8192, 132) == 5  # ceil(264 / 64)
    with pytest.raises(ValueError, match="num_seqs"):
        decode_num_splits(0, 8, 10, 132)
    with pytest.raises(ValueError, match="max_context_len"):
        decode_num_splits(1, 8, -1, 132)
