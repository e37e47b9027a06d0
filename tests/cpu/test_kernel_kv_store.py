"""Fused KV store: the Triton kernel under the Triton interpreter (CPU) bit-exact with
store_kv_reference, the reference against a naive per-token loop, and the launcher's checks.

The kernel runs in a child Python with TRITON_INTERPRET=1 (see test_kernel_nvfp4_quantize.py for
why). The interpreter handles bf16 wrongly (numpy has no bf16), so it checks fp32 and fp16 caches;
bf16 runs in tests/gpu/test_kv_store.py.
"""

import pytest
import torch

from mixquant_serve.model.attention import store_kv_reference
from tests.interpret import run_interpreted


INTERPRETED_CHECK = r"""
import torch
from kernels.kv_store import kv_store
from mixquant_serve.model.attention import store_kv_reference


def case(name, g, cache_dtype, kv_dtype, kv_heads, head_dim, block_size, slots, index_dtype, row_pad):
    cache = torch.randn(9, 3, 2, block_size, kv_heads, head_dim, generator=g).to(cache_dtype)
    tokens = len(slots)
    # k, v rows strided when row_pad > 0 (unit stride along head_dim only)
    k = torch.randn(tokens, kv_heads, head_dim + row_pad, generator=g).to(kv_dtype)[:, :, :head_dim]
    v = torch.randn(tokens, kv_heads, head_dim + row_pad, generator=g).to(kv_dtype)[:, :, :head_dim]
    blocks = torch.tensor([b for b, _ in slots], dtype=index_dtype)
    offsets = torch.tensor([o for _, o in slots], dtype=index_dtype)
    actual, expected = cache.clone(), cache.clone()
    kv_store(k, v, actual, 2, blocks, offsets)
    store_kv_reference(expected, 2, k, v, blocks, offsets)
    bits = torch.int32 if cache_dtype == torch.float32 else torch.int16
    bad = (actual.view(bits) != expected.view(bits)).nonzero()
    return f"{name}: {len(bad)} elements differ, first {bad[:6].tolist()}" if len(bad) else None


g = torch.Generator().manual_seed(0)
cases = [
    # name, cache dtype, k/v dtype, kv_heads, head_dim, block_size, (block, offset) slots, index dtype, row pad
    ("fp32", torch.float32, torch.float32, 2, 32, 16, [(0, 0), (8, 15), (3, 7)], torch.int64, 0),
    ("fp16 -> fp32, odd heads and head_dim", torch.float32, torch.float16, 3, 20, 5, [(4, 4), (1, 0)], torch.int64, 0),
    ("fp32 -> fp16 rounds", torch.float16, torch.float32, 1, 64, 3, [(2, 1), (7, 2)], torch.int32, 0),
    ("padding rows skipped", torch.float32, torch.float32, 2, 16, 4, [(-1, 0), (5, 3), (-1, 2), (6, 0)], torch.int64, 0),
    ("strided rows", torch.float16, torch.float16, 2, 32, 16, [(1, 1), (1, 2), (2, 9)], torch.int32, 24),
]
failures = [message for name, *args in cases if (message := case(name, g, *args))]
print("\n".join(failures) if failures else "all cases bit-exact")
raise SystemExit(1 if failures else 0)
"""


def test_kernel_matches_reference_under_interpreter() -> None:
    stdout = run_interpreted(INTERPRETED_CHECK)
    assert "all cases bit-exact" in stdout, stdout[-4000:]


def test_reference_matches_naive_loop() -> None:
    g = torch.Generator().manual_seed(1)
    cache = torch.randn(6, 2, 2, 4, 2, 8, generator=g)
    k = torch.randn(5, 2, 8, generator=g)
    v = torch.randn(5, 2, 8, generator=g)
    blocks = torch.tensor([2, -1, 0, 5, 2])
    offsets = torch.tensor([3, 1, 0, 2, 0])
    expected = cache.clone()
    for t in range(5):
        if blocks[t] >= 0:
            expected[blocks[t], 1, 0, offsets[t]] = k[t]
            expected[blocks[t], 1, 1, offsets[t]] = v[t]
    actual = cache.clone()
    store_kv_reference(actual, 1, k, v, blocks, offsets)
    assert torch.equal(actual, expected)
    # the padding row's slot (block -1 would be the last block) is untouched
    assert torch.equal(actual[5, 1, :, 1], cache[5, 1, :, 1])


def test_launcher_rejects_bad_arguments() -> None:
    pytest.importorskip("triton")
    from kernels.kv_store import kv_store

    cache = torch.zeros(4, 2, 2, 16, 2, 32)
    k = torch.zeros(3, 2, 32)
    slots = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="cache must be a contiguous"):
        kv_store(k, k, cache.transpose(3, 4), 0, slots, slots)
    with pytest.raises(ValueError, match="cache must be float32"):
        kv_store(k, k, cache.double(), 0, slots, slots)
    with pytest.raises(ValueError, match="layer"):
        kv_store(k, k, cache, 2, slots, slots)
    with pytest.raises(ValueError, match="k must have shape"):
        kv_store(torch.zeros(3, 1, 32), k, cache, 0, slots, slots)
    with pytest.raises(ValueError, match="v must have unit stride"):
        kv_store(k, torch.zeros(3, 32, 2).transpose(1, 2), cache, 0, slots, slots)
    with pytest.raises(ValueError, match="slot_blocks"):
        kv_store(k, k, cache, 0, slots.float(), slots)
    with pytest.raises(ValueError, match="slot_offsets"):
        kv_store(k, k, cache, 0, slots, torch.zeros(6, dtype=torch.long)[::2])
