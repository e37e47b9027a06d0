"""Fused KV-store kernel on CUDA: bit-exact with store_kv_reference for every cache/input dtype pair,
Llama and odd shapes, int32 and int64 slot tensors, padding rows and strided k/v; untouched slots
keep their (poisoned) contents."""

import pytest
import torch

from mixquant_serve.model.attention import store_kv_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# kv_heads, head_dim, block_size, tokens
SHAPES = [(8, 128, 16, 1), (8, 128, 16, 3001), (2, 64, 5, 37), (3, 80, 1, 9), (1, 20, 7, 4)]
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    a, e = actual.view(BITS[actual.dtype]), expected.view(BITS[expected.dtype])
    bad = (a != e).nonzero()
    if len(bad):
        pytest.fail(f"{what}: {len(bad)} of {a.numel()} elements differ; first (block, layer, kv, offset, head, dim) "
                    f"{bad[:6].tolist()}")


def store_both(cache, layer, k, v, blocks, offsets):
    from kernels.kv_store import kv_store

    actual, expected = cache.clone(), cache.clone()
    kv_store(k, v, actual, layer, blocks, offsets)
    store_kv_reference(expected, layer, k, v, blocks, offsets)
    return actual, expected


@pytest.mark.parametrize("kv_dtype", DTYPES)
@pytest.mark.parametrize("cache_dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"kv{s[0]}d{s[1]}b{s[2]}t{s[3]}")
def test_kernel_bit_exact(shape, cache_dtype, kv_dtype) -> None:
    kv_heads, head_dim, block_size, tokens = shape
    g = torch.Generator(device="cuda").manual_seed(tokens * 31 + head_dim)
    num_blocks = -(-tokens // block_size) + 4
    # poisoned cache: NaN everywhere, so a stray or missing write shows
    cache = torch.full((num_blocks, 3, 2, block_size, kv_heads, head_dim), float("nan"), dtype=cache_dtype,
                       device="cuda")
    k = torch.randn(tokens, kv_heads, head_dim, device="cuda", generator=g).to(kv_dtype)
    v = torch.randn(tokens, kv_heads, head_dim, device="cuda", generator=g).to(kv_dtype)
    slots = torch.randperm(num_blocks * block_size, device="cuda", generator=g)[:tokens]  # distinct slots
    actual, expected = store_both(cache, 1, k, v, slots // block_size, slots % block_size)
    assert_bits_equal(actual, expected, f"{shape} {kv_dtype}->{cache_dtype}")
    assert not actual[:, 1].isnan().all(), "nothing was stored"


def test_padding_rows_int32_slots_and_strided_rows() -> None:
    g = torch.Generator(device="cuda").manual_seed(5)
    cache = torch.randn(10, 4, 2, 16, 8, 128, device="cuda", generator=g).to(torch.bfloat16)
    # k and v as views into a fused [tokens, q + k + v] projection output: strided token rows
    qkv = torch.randn(6, 48, 128, device="cuda", generator=g).to(torch.bfloat16)
    k, v = qkv[:, 32:40], qkv[:, 40:48]
    blocks = torch.tensor([3, -1, 9, 0, -1, 3], dtype=torch.int32, device="cuda")
    offsets = torch.tensor([0, 5, 15, 7, 0, 1], dtype=torch.int32, device="cuda")
    actual, expected = store_both(cache, 3, k, v, blocks, offsets)
    assert_bits_equal(actual, expected, "padding rows")
    unchanged = torch.ones(10, 4, 2, 16, dtype=torch.bool, device="cuda")
    unchanged[[3, 9, 0, 3], 3, :, [0, 15, 7, 1]] = False
    assert torch.equal(actual[unchanged], cache[unchanged]), "a slot other than the four real ones changed"
