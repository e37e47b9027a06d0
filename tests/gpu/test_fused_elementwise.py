"""The one-launch elementwise kernels of the forward on CUDA: rotary on q and k in place, residual add +
RMSNorm (plain, fp8, nvfp4 outputs), plain RMSNorm and SiLU(gate) * up, against their torch references.

Fresh random inputs, odd shapes, strided views, outputs allocated over freed NaN memory (poisoned).
"""

import pytest
import torch

from mixquant_serve.model.config import RopeConfig
from mixquant_serve.model.rope import RotaryEmbedding, apply_rotary, apply_rotary_reference
from mixquant_serve.quant import fp8
from mixquant_serve.quant.activation import (add_rms_norm, add_rms_norm_for_linear, quantize_activation, rms_norm,
                                             rms_norm_for_linear, silu_mul, silu_mul_for_linear)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def poison(numel: int, dtype: torch.dtype) -> None:
    """Leave a freed block of NaN where the next allocation of that size lands."""
    garbage = torch.full((numel,), float("nan"), dtype=dtype, device="cuda")
    del garbage


def report(actual: torch.Tensor, expected: torch.Tensor) -> str:
    bad = (actual != expected).nonzero()[:6]
    return f"{(actual != expected).sum().item()} differ, first {bad.tolist()}: got " \
           f"{actual[tuple(bad.T)].tolist()} expected {expected[tuple(bad.T)].tolist()}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "heads", "kv_heads", "head_dim"),
                         [(1, 32, 8, 128), (7, 3, 1, 64), (130, 12, 4, 80), (33, 5, 5, 6)])
def test_rotary_in_place_is_the_reference(dtype: torch.dtype, tokens: int, heads: int, kv_heads: int,
                                          head_dim: int) -> None:
    rotary = RotaryEmbedding(RopeConfig(theta=500000.0), head_dim, 4096)
    rotary.reset_buffers(torch.device("cuda"))
    positions = torch.randint(0, 4096, (tokens,), device="cuda")
    cos_sin = rotary(positions)
    # q and k as the model has them: strided views of one qkv output row, v after them
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device="cuda").to(dtype) * 3
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    q = qkv[:, :q_size].view(tokens, heads, head_dim)
    k = qkv[:, q_size:q_size + kv_size].view(tokens, kv_heads, head_dim)
    v_before = qkv[:, q_size + kv_size:].clone()
    expected_q, expected_k = apply_rotary_reference(q, k, cos_sin)
    rotated_q, rotated_k = apply_rotary(q, k, cos_sin)
    assert rotated_q.data_ptr() == q.data_ptr() and rotated_k.data_ptr() == k.data_ptr(), "not in place"
    # bf16/fp16: each product and sum rounded as torch rounds them; fp32 without FMA contraction
    assert torch.equal(q, expected_q), report(q, expected_q)
    assert torch.equal(k, expected_k), report(k, expected_k)
    assert torch.equal(qkv[:, q_size + kv_size:], v_before), "v was touched"


def test_rotary_table_matches_per_forward_computation() -> None:
    """The cos/sin table gathered by position equals the per-forward cos/sin of the former rope.py (llama3 scaling)."""
    rope = RopeConfig(theta=500000.0, kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192)
    rotary = RotaryEmbedding(rope, 128, 131072)
    rotary.reset_buffers(torch.device("cuda"))
    positions = torch.tensor([0, 1, 17, 4095, 8191, 65537, 131071], device="cuda")
    freqs = positions.to(torch.float32)[:, None] * rotary.inv_freq[None, :]
    expected = torch.cat((freqs.cos(), freqs.sin()), dim=-1) * rotary.attention_scaling
    assert torch.equal(rotary(positions), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "k"), [(1, 4096), (5, 100), (300, 4096), (3, 14336), (2, 1)])
def test_plain_rmsnorm_and_residual_add(dtype: torch.dtype, m: int, k: int) -> None:
    weight = (torch.rand(k, device="cuda") + 0.5).to(dtype)
    wide = (torch.randn(m, k + 3, device="cuda") * 3).to(dtype)
    x = wide[:, :k]  # strided rows
    delta = (torch.randn(m, k, device="cuda") * 2).to(dtype)
    poison(m * k, dtype)
    normalized = rms_norm_for_linear(x, weight, 1e-5, "bf16")
    poison(m * k, dtype)
    residual, added_normalized = add_rms_norm_for_linear(x, delta, weight, 1e-5, "bf16")
    expected_residual, expected_added = add_rms_norm(x, delta, weight, 1e-5)
    # the residual add is one rounding in both: bit for bit
    assert torch.equal(residual, expected_residual), report(residual, expected_residual)
    tolerance = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    for actual, expected in ((normalized, rms_norm(x, weight, 1e-5)), (added_normalized, expected_added)):
        assert actual.dtype == dtype and actual.shape == (m, k)
        assert torch.isfinite(actual).all()
        torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance)
        if dtype != torch.float32:
            # the sum of squares is summed in another order: a bf16/fp16 ulp moves, rarely (an fp32 ulp
            # moves in a large share of the entries: the rsqrt factor differs in its last bits)
            differing = (actual != expected).float().mean().item()
            assert differing <= 0.02, differing
    # exact rows (+-2^e, eps = 0, unit weight): the normalized row is +-1 in every implementation
    signs = torch.randint(0, 2, (m, k), device="cuda").to(dtype) * 2 - 1
    exact = signs * torch.exp2(torch.randint(-6, 6, (m, 1), device="cuda").to(dtype))
    ones = torch.ones(k, dtype=dtype, device="cuda")
    assert torch.equal(rms_norm_for_linear(exact, ones, 0.0, "bf16"), signs)
    residual, normalized = add_rms_norm_for_linear(exact, torch.zeros_like(exact), ones, 0.0, "bf16")
    assert torch.equal(residual, exact) and torch.equal(normalized, signs)


@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "k"), [(1, 16), (17, 100), (300, 4096)])
def test_add_rmsnorm_quantize_is_the_reference(precision: str, dtype: torch.dtype, m: int, k: int) -> None:
    if precision == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("the fp8 cast needs sm_89+")
    weight = (torch.rand(k, device="cuda") + 0.5).to(dtype)
    # x + delta is an exact row (+-2^e): its normalization is exact everywhere, so every bit must match
    signs = torch.randint(0, 2, (m, k), device="cuda").to(dtype) * 2 - 1
    target = signs * torch.exp2(torch.randint(-6, 6, (m, 1), device="cuda").to(dtype))
    x = target * 0.75
    delta = target * 0.25
    poison(m * k, dtype)
    residual, fused = add_rms_norm_for_linear(x, delta, weight, 0.0, precision)
    assert not isinstance(fused, torch.Tensor), "the fused kernel did not run"
    expected_residual, expected = add_rms_norm(x, delta, weight, 0.0)
    reference = quantize_activation(expected, precision)
    assert torch.equal(residual, expected_residual)
    if precision == "fp8":
        assert torch.equal(fused.data.view(torch.uint8), reference.data.view(torch.uint8))
        assert torch.equal(fused.scale, reference.scale)
    else:
        assert torch.equal(fused.packed, reference.packed)
        assert torch.equal(fused.block_scale.view(torch.uint8), reference.block_scale.view(torch.uint8))
        assert torch.equal(fused.global_scale, reference.global_scale)
    # random rows: the residual is still bit for bit, the quantized row decodes near the reference's
    x, delta = (torch.randn(m, k, device="cuda") * 3).to(dtype), torch.randn(m, k, device="cuda").to(dtype)
    residual, fused = add_rms_norm_for_linear(x, delta, weight, 1e-5, precision)
    expected_residual, expected = add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(residual, expected_residual)
    if precision == "fp8":
        decoded = fused.data.float() * fused.scale
        limit = 0.07 * expected.float().abs().amax(dim=-1, keepdim=True)  # e4m3: 3 mantissa bits
        assert ((decoded - expected.float()).abs() <= limit).all()
        assert isinstance(fused, fp8.FP8Tensor)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "inner"), [(1, 14336), (17, 40), (300, 4096), (3, 1)])
def test_plain_silu_mul_is_the_reference(dtype: torch.dtype, m: int, inner: int) -> None:
    gate_up = (torch.randn(m, 2 * inner, device="cuda") * 4).to(dtype)
    poison(m * inner, dtype)
    product = silu_mul_for_linear(gate_up, "bf16")
    expected = silu_mul(gate_up)
    assert product.shape == (m, inner) and product.dtype == dtype
    if dtype == torch.float32:  # torch's fp32 SiLU may divide differently: a few fp32 ulps
        torch.testing.assert_close(product, expected, rtol=1e-6, atol=1e-6)
    else:  # libdevice expf and a correctly rounded division, rounded as torch rounds: bit for bit
        assert torch.equal(product, expected), report(product, expected)


def test_launchers_reject_bad_input() -> None:
    from kernels.rmsnorm_quantize import add_rmsnorm_plain
    from kernels.rotary import rotary_inplace

    x = torch.randn(4, 64, device="cuda")
    with pytest.raises(ValueError, match="delta"):
        add_rmsnorm_plain(x, torch.randn(4, 32, device="cuda"), torch.ones(64, device="cuda"), 1e-6)
    q, k = torch.randn(3, 4, 8, device="cuda"), torch.randn(3, 2, 8, device="cuda")
    with pytest.raises(ValueError, match="cos_sin"):
        rotary_inplace(q, k, torch.randn(3, 8, device="cuda").double())
    with pytest.raises(ValueError, match="share"):
        rotary_inplace(q, k.half(), torch.randn(3, 8, device="cuda"))
