"""The one-launch elementwise kernels under the Triton interpreter (CPU): rotary in place, plain RMSNorm,
residual add + RMSNorm (plain and nvfp4), plain SiLU(gate) * up; and the rope table against the
per-forward cos/sin it replaced.

fp32 and fp16 only in the interpreter (it rounds fp32 -> bf16 by truncation; bf16 is checked bit for
bit on the GPU in tests/gpu/test_fused_elementwise.py). Bit-exact where every implementation computes
the same row: rotary (each product and sum rounded as torch rounds them, no FMA), the residual add,
exact RMSNorm rows (+-2^e, eps = 0), gates >= 20 (SiLU(g) = g in fp32). The kernels run in a child
Python with TRITON_INTERPRET=1 (see test_kernel_nvfp4_quantize.py for why); the launchers' argument
checks and the torch references run here.
"""

import pytest
import torch

from mixquant_serve.model.config import RopeConfig
from mixquant_serve.model.rope import RotaryEmbedding, apply_rotary, apply_rotary_reference
from tests.interpret import run_interpreted


INTERPRETED_CHECK = r"""
import torch
from kernels.rmsnorm_quantize import add_rmsnorm_plain, add_rmsnorm_quantize_nvfp4, rmsnorm_plain
from kernels.rotary import rotary_inplace
from kernels.silu_mul_quantize import silu_mul_plain
from mixquant_serve.model.config import RopeConfig
from mixquant_serve.model.rope import RotaryEmbedding, apply_rotary_reference
from mixquant_serve.quant import nvfp4
from mixquant_serve.quant.activation import add_rms_norm, rms_norm, silu_mul

g = torch.Generator().manual_seed(0)
failures = []


def check(name, actual, expected):
    same = (actual == expected) | (torch.isnan(actual.float()) & torch.isnan(expected.float()))
    if actual.shape != expected.shape:
        failures.append(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    elif not same.all():
        bad = (~same).nonzero()[:6]
        failures.append(f"{name}: {(~same).sum().item()} differ, first {bad.tolist()}: got "
                        f"{actual[tuple(bad.T)].tolist()} expected {expected[tuple(bad.T)].tolist()}")


for dtype in (torch.float32, torch.float16):
    # rotary: q, k strided views of one qkv row; v must stay untouched
    for tokens, heads, kv_heads, head_dim in [(1, 4, 2, 16), (5, 3, 1, 10), (3, 6, 3, 6)]:
        rotary = RotaryEmbedding(RopeConfig(theta=10000.0), head_dim, 64)
        cos_sin = rotary(torch.randint(0, 64, (tokens,), generator=g))
        qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g) * 3).to(dtype)
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        q = qkv[:, :q_size].view(tokens, heads, head_dim)
        k = qkv[:, q_size:q_size + kv_size].view(tokens, kv_heads, head_dim)
        v = qkv[:, q_size + kv_size:].clone()
        expected_q, expected_k = apply_rotary_reference(q, k, cos_sin)
        rotary_inplace(q, k, cos_sin)
        label = f"{tokens}x{heads}/{kv_heads}x{head_dim} {dtype}"
        check(f"rotary q {label}", q, expected_q)
        check(f"rotary k {label}", k, expected_k)
        check(f"rotary v untouched {label}", qkv[:, q_size + kv_size:], v)

    for m, k in [(1, 16), (3, 48), (2, 100), (2, 600)]:
        weight = (torch.rand(k, generator=g) + 0.5).to(dtype)
        signs = torch.randint(0, 2, (m, k), generator=g).to(dtype) * 2 - 1
        exact = signs * torch.exp2(torch.randint(-6, 6, (m, 1), generator=g).to(dtype))
        # exact rows: normalized to +-1 everywhere, so weight * +-1 bit for bit
        check(f"rmsnorm exact {m}x{k} {dtype}", rmsnorm_plain(exact, weight, 0.0), rms_norm(exact, weight, 0.0))
        residual, normalized = add_rmsnorm_plain(exact * 0.75, exact * 0.25, weight, 0.0)
        expected_residual, expected = add_rms_norm(exact * 0.75, exact * 0.25, weight, 0.0)
        check(f"add_rmsnorm residual {m}x{k} {dtype}", residual, expected_residual)
        check(f"add_rmsnorm exact {m}x{k} {dtype}", normalized, expected)
        if dtype == torch.float16:  # the nvfp4 path is integer arithmetic, exact in the interpreter
            residual, packed, block_scale, global_scale = add_rmsnorm_quantize_nvfp4(exact * 0.75, exact * 0.25,
                                                                                     weight, 0.0)
            reference = nvfp4.quantize(expected, nvfp4.row_encode_scales(expected))
            check(f"add_rmsnorm nvfp4 residual {m}x{k}", residual, expected_residual)
            check(f"add_rmsnorm nvfp4 packed {m}x{k}", packed, reference.packed)
            check(f"add_rmsnorm nvfp4 block scale {m}x{k}", block_scale.view(torch.uint8),
                  reference.block_scale.view(torch.uint8))
            check(f"add_rmsnorm nvfp4 global scale {m}x{k}", global_scale, reference.global_scale)
        # random rows and a strided delta: residual bit for bit, the norm within a few ulps
        x = (torch.randn(m, k, generator=g) * 3).to(dtype)
        delta = (torch.randn(m, k + 5, generator=g)).to(dtype)[:, :k]
        residual, normalized = add_rmsnorm_plain(x, delta, weight, 1e-5)
        expected_residual, expected = add_rms_norm(x, delta, weight, 1e-5)
        check(f"add_rmsnorm random residual {m}x{k} {dtype}", residual, expected_residual)
        tolerance = 2e-3 if dtype == torch.float16 else 1e-5
        if not torch.allclose(normalized, expected, rtol=tolerance, atol=tolerance):
            failures.append(f"add_rmsnorm random {m}x{k} {dtype}: max difference "
                            f"{(normalized.float() - expected.float()).abs().max().item()}")
        # SiLU * up with gates of 20..60 (SiLU(g) = g) or 0: exact everywhere
        gate = torch.rand(m, k, generator=g) * 40 + 20
        gate[:, ::5] = 0.0
        gate_up = torch.cat([gate, torch.randn(m, k, generator=g)], 1).to(dtype)
        check(f"silu_mul exact {m}x{k} {dtype}", silu_mul_plain(gate_up, accurate_exp=False), silu_mul(gate_up))

print("FAILURES:" + "\n".join(failures) if failures else "ALL EXACT")
"""


def test_kernels_under_interpreter() -> None:
    stdout = run_interpreted(INTERPRETED_CHECK)
    assert stdout.strip().endswith("ALL EXACT"), stdout[-4000:]


def test_rope_table_equals_per_forward_cos_sin() -> None:
    """The table replaces cos/sin computed per forward from the positions: same fp32 ops, same values."""
    for rope in (RopeConfig(theta=500000.0, kind="llama3", factor=8.0, original_max_position_embeddings=8192),
                 RopeConfig(theta=10000.0, kind="yarn", factor=4.0, original_max_position_embeddings=1024)):
        rotary = RotaryEmbedding(rope, 64, 16384)
        positions = torch.tensor([0, 1, 5, 1023, 4097, 16383])
        freqs = positions.to(torch.float32)[:, None] * rotary.inv_freq[None, :]
        expected = torch.cat((freqs.cos(), freqs.sin()), dim=-1) * rotary.attention_scaling
        torch.testing.assert_close(rotary(positions), expected, rtol=0, atol=1e-6)


def test_apply_rotary_reference_is_rotate_half() -> None:
    """apply_rotary on CPU is transformers' rotate-half formula: x * cos + rotate_half(x) * sin."""
    g = torch.Generator().manual_seed(1)
    rotary = RotaryEmbedding(RopeConfig(theta=10000.0), 8, 32)
    positions = torch.tensor([3, 0, 31])
    q, k = torch.randn(3, 2, 8, generator=g), torch.randn(3, 1, 8, generator=g)
    angles = positions.float()[:, None] * rotary.inv_freq[None, :]
    cos, sin = torch.cat((angles, angles), -1).cos()[:, None], torch.cat((angles, angles), -1).sin()[:, None]

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        return torch.cat((-x[..., 4:], x[..., :4]), dim=-1)

    rotated_q, rotated_k = apply_rotary(q, k, rotary(positions))
    torch.testing.assert_close(rotated_q, q * cos + rotate_half(q) * sin, rtol=0, atol=1e-6)
    torch.testing.assert_close(rotated_k, k * cos + rotate_half(k) * sin, rtol=0, atol=1e-6)
    assert not torch.equal(rotated_q, q)


def test_launchers_reject_bad_input() -> None:
    pytest.importorskip("triton")
    from kernels.rmsnorm_quantize import add_rmsnorm_plain, rmsnorm_plain
    from kernels.rotary import rotary_inplace
    from kernels.silu_mul_quantize import silu_mul_plain

    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="delta"):
        add_rmsnorm_plain(x, torch.randn(4, 32), torch.ones(64), 1e-6)
    with pytest.raises(ValueError, match="weight"):
        rmsnorm_plain(x, torch.ones(64, dtype=torch.float16), 1e-6)
    with pytest.raises(ValueError, match="x must be float32, bfloat16 or float16"):
        rmsnorm_plain(x.double(), torch.ones(64, dtype=torch.float64), 1e-6)
    with pytest.raises(ValueError, match="gate_up"):
        silu_mul_plain(torch.randn(2, 7))
    q, k = torch.randn(3, 4, 8), torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match="cos_sin"):
        rotary_inplace(q, k, torch.randn(3, 6))
    with pytest.raises(ValueError, match="head_dim must be even"):
        rotary_inplace(torch.randn(3, 4, 7), torch.randn(3, 2, 7), torch.randn(3, 7))
    with pytest.raises(ValueError, match="unit stride"):
        rotary_inplace(torch.randn(3, 8, 4).transpose(1, 2), torch.randn(3, 2, 8), torch.randn(3, 8))
