"""Decode paged-attention kernel on CUDA against decode_attention_reference: fresh random inputs,
poisoned output and partial buffers, odd shapes (GQA ratios 1/3/4/8, head_dim 64/80/128, block
sizes 1/5/16, contexts not a multiple of the block size, empty contexts), split-K off and on."""

import pytest
import torch

from mixquant_serve.model.attention import decode_attention_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# p is rounded to the cache dtype before the PV product: bf16 keeps 8 bits
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]

# heads, kv_heads, head_dim, block_size, context lens
SHAPES = [
    (32, 8, 128, 16, [1, 15, 16, 17, 1000, 4097]),  # Llama-3.1-8B
    (4, 4, 64, 16, [33, 2]),  # MHA
    (6, 2, 80, 5, [0, 1, 211, 64]),  # GQA 3, head_dim 80, block 5, an empty context
    (16, 2, 128, 1, [300, 7]),  # GQA 8, one token a block
]


def run_kernel(q, cache, layer, tables, lens, scale, num_splits):
    """The launcher after same-sized blocks were filled with NaN and freed: the caching allocator hands
    the kernel poisoned output and partial buffers, so everything read back must have been written."""
    from kernels.paged_attention import paged_attention_decode

    seqs, heads, head_dim = q.shape
    garbage = [torch.full((seqs, heads, head_dim), float("nan"), dtype=q.dtype, device=q.device),
               torch.full((seqs, heads, num_splits, head_dim), float("nan"), device=q.device),
               torch.full((seqs, heads, num_splits), float("nan"), device=q.device),
               torch.full((seqs, heads, num_splits), float("nan"), device=q.device)]
    del garbage
    return paged_attention_decode(q, cache, layer, tables, lens, scale, num_splits)


def make_inputs(seed, dtype, heads, kv_heads, head_dim, block_size, context_lens):
    g = torch.Generator(device="cuda").manual_seed(seed)
    width = max(1, max(-(-c // block_size) for c in context_lens))
    num_blocks = width * len(context_lens) + 3
    cache = torch.randn(num_blocks, 2, 2, block_size, kv_heads, head_dim, device="cuda", generator=g).to(dtype)
    # disjoint, shuffled blocks per sequence
    order = torch.randperm(num_blocks, device="cuda", generator=g)[: width * len(context_lens)]
    tables = order.view(len(context_lens), width).to(torch.int32)
    q = torch.randn(len(context_lens), heads, head_dim, device="cuda", generator=g).to(dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    return q, cache, tables, lens


def assert_close(actual, expected, dtype, what):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    error = (actual.float() - expected.float()).abs()
    bad = ~(error <= TOLERANCE[dtype])  # NaN counts as bad
    if bad.any():
        first = bad.nonzero()[:8].tolist()
        pytest.fail(f"{what}: {int(bad.sum())} of {bad.numel()} exceed {TOLERANCE[dtype]}, max error "
                    f"{error.nan_to_num(float('inf')).max().item():.3g}, first (seq, head, dim) {first}")


@pytest.mark.parametrize("num_splits", [1, 4, 32])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"h{s[0]}kv{s[1]}d{s[2]}b{s[3]}")
def test_kernel_matches_reference(shape, dtype, num_splits) -> None:
    heads, kv_heads, head_dim, block_size, context_lens = shape
    q, cache, tables, lens = make_inputs(hash((shape[:4], num_splits)) % 2**31, dtype, *shape)
    scale = head_dim**-0.5
    out = run_kernel(q, cache, 1, tables, lens, scale, num_splits)
    expected = decode_attention_reference(q, cache, 1, tables, lens, scale)
    assert_close(out, expected, dtype, f"{shape} {dtype} splits={num_splits}")


def test_strided_q_and_tables_and_policy_splits() -> None:
    from kernels.paged_attention import decode_num_splits

    heads, kv_heads, head_dim, block_size = 32, 8, 128, 16
    context_lens = [8191, 3, 500]
    q, cache, tables, lens = make_inputs(7, torch.bfloat16, heads, kv_heads, head_dim, block_size, context_lens)
    # q as a slice of a fused qkv row: strided heads; tables as a column slice: strided rows
    qkv = torch.randn(3, heads + 2 * kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    qkv[:, :heads] = q
    wide_tables = torch.zeros(3, tables.shape[1] + 9, dtype=torch.int32, device="cuda")
    wide_tables[:, : tables.shape[1]] = tables
    num_splits = decode_num_splits(3, kv_heads, max(context_lens), torch.cuda.get_device_properties(0).multi_processor_count)
    out = run_kernel(qkv[:, :heads], cache, 0, wide_tables[:, : tables.shape[1]], lens, 0.1, num_splits)
    expected = decode_attention_reference(q, cache, 0, tables, lens, 0.1)
    assert_close(out, expected, torch.bfloat16, f"strided, {num_splits} splits")


def test_split_count_does_not_change_the_result_beyond_rounding() -> None:
    q, cache, tables, lens = make_inputs(11, torch.float32, 8, 2, 64, 16, [2000, 777])
    outs = [run_kernel(q, cache, 1, tables, lens, 0.125, s) for s in (1, 2, 7, 32)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-6)
