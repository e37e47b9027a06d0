"""The NVFP4 decode kernel and the scaled dense GEMM under the Triton interpreter (CPU).

The decode must equal nvfp4.block_values bit for bit (it is exact: see kernels/nvfp4_decode.py);
the GEMM must match mixquant_serve.quant.matmul.scaled_matmul within fp32 summation error on odd
shapes (tails in M, N and K), with and without bias, per-row/per-column or single scales, and the
two chained must match reference_linear's product. The GEMM runs on fp16 operands here (the
interpreter's tl.dot gives garbage for bf16; decoded NVFP4 values are exact in both);
tests/gpu/test_fused_prefill.py runs it in bf16. Child process with TRITON_INTERPRET=1 (see
test_kernel_nvfp4_quantize.py); the launchers' argument checks run here.
"""

import pytest
import torch
from tests.interpret import run_interpreted


INTERPRETED_CHECK = r"""
import torch
from kernels.nvfp4_decode import nvfp4_decode
from kernels.scaled_gemm import SMALL_CONFIG, scaled_gemm
from mixquant_serve.quant import nvfp4
from mixquant_serve.quant.matmul import scaled_matmul

g = torch.Generator().manual_seed(0)
failures = []

for rows, k in [(1, 16), (5, 48), (3, 100), (7, 1100)]:  # 100: padded K; 1100: two programs along K
    x = torch.randn(rows, k, generator=g) * torch.exp2(torch.randint(-8, 8, (rows, 1), generator=g).float())
    if rows > 1:
        x[1, :16] = 0.0  # a zero block
    q = nvfp4.quantize(x, nvfp4.row_encode_scales(x))
    expected = nvfp4.block_values(q)
    for dtype in (torch.bfloat16, torch.float16):
        garbage = torch.full(expected.shape, float("nan"), dtype=dtype)
        out = nvfp4_decode(q.packed, q.block_scale, out_dtype=dtype, out=garbage)
        if not torch.equal(out.float(), expected):
            bad = (out.float() != expected).nonzero()[:6]
            failures.append(f"decode {rows}x{k} {dtype}: {len(bad)}+ differ at {bad.tolist()}: "
                            f"{out.float()[tuple(bad.T)].tolist()} vs {expected[tuple(bad.T)].tolist()}")

for m, n, k in [(1, 24, 16), (17, 40, 48), (33, 24, 80)]:  # K = 80: a masked K tail at BLOCK_K = 32
    a = torch.randn(m, k, generator=g).to(torch.float16)  # fp16: the interpreter's tl.dot on bf16 is wrong
    w = torch.randn(n, k, generator=g).to(torch.float16)
    bound = (a.float().abs() @ w.float().abs().T)
    for row_scale, col_scale in [(torch.rand(m, generator=g) + 0.5, torch.rand(n, generator=g) + 0.5),
                                 (torch.tensor([0.25]), torch.tensor([3.0]))]:
        for bias in (None, torch.randn(n, generator=g)):
            out = scaled_gemm(a, w, row_scale, col_scale, torch.float32, bias=bias, config=SMALL_CONFIG)
            expected = scaled_matmul(a, w, row_scale, col_scale, bias)
            limit = 1e-5 * bound * row_scale.reshape(-1, 1) * col_scale.reshape(1, -1) + 1e-6
            if out.shape != expected.shape or not ((out - expected).abs() <= limit).all():
                failures.append(f"gemm {m}x{n}x{k} bias={bias is not None} scales={row_scale.numel()}: max |diff| "
                                f"{(out - expected).abs().max().item():.3e}")
    out16 = scaled_gemm(a, w, torch.ones(1), torch.ones(1), torch.float16, config=SMALL_CONFIG)
    if out16.dtype != torch.float16 or out16.shape != (m, n):
        failures.append(f"gemm bf16 out: {out16.dtype} {tuple(out16.shape)}")

# decode + GEMM = the reference's product: per-token activation scales, per-part weight scales
x, w = torch.randn(9, 64, generator=g), torch.randn(40, 64, generator=g)
qa = nvfp4.quantize(x, nvfp4.row_encode_scales(x))
w_gs = torch.cat([nvfp4.global_encode_scale(w[:24]).expand(24), nvfp4.global_encode_scale(w[24:]).expand(16)])
qw = nvfp4.quantize(w, w_gs.reshape(-1, 1))
out = scaled_gemm(nvfp4_decode(qa.packed, qa.block_scale, torch.float16),
                  nvfp4_decode(qw.packed, qw.block_scale, torch.float16),
                  torch.reciprocal(qa.global_scale), torch.reciprocal(qw.global_scale), torch.float32,
                  config=SMALL_CONFIG)
expected = nvfp4.dequantize(qa) @ nvfp4.dequantize(qw).T
if not torch.allclose(out, expected, rtol=1e-5, atol=1e-5):
    failures.append(f"decode + gemm vs reference: max |diff| {(out - expected).abs().max().item():.3e}")

print("\n".join(failures) if failures else "all cases match")
raise SystemExit(1 if failures else 0)
"""


def test_kernels_match_reference_under_interpreter() -> None:
    stdout = run_interpreted(INTERPRETED_CHECK)
    assert "all cases match" in stdout, stdout[-4000:]


def test_launchers_reject_bad_arguments() -> None:
    pytest.importorskip("triton")
    from kernels.nvfp4_decode import nvfp4_decode
    from kernels.scaled_gemm import GemmConfig, scaled_gemm

    packed = torch.zeros(4, 16, dtype=torch.uint8)
    scale = torch.zeros(4, 2, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="packed must be a contiguous 2-D uint8"):
        nvfp4_decode(packed.float(), scale)
    with pytest.raises(ValueError, match="multiple of 8 bytes"):
        nvfp4_decode(torch.zeros(4, 12, dtype=torch.uint8), scale)
    with pytest.raises(ValueError, match="block_scale must be a contiguous float8_e4m3fn tensor of shape \\(4, 2\\)"):
        nvfp4_decode(packed, scale[:, :1].contiguous())
    with pytest.raises(ValueError, match="out_dtype must be bfloat16 or float16"):
        nvfp4_decode(packed, scale, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        nvfp4_decode(packed, scale, out=torch.empty(4, 16, dtype=torch.bfloat16))

    a, w = torch.zeros(3, 32, dtype=torch.bfloat16), torch.zeros(5, 32, dtype=torch.bfloat16)
    one = torch.ones(1)
    with pytest.raises(ValueError, match="a and w must be contiguous 2-D"):
        scaled_gemm(a.t(), w, one, one, torch.float32)
    with pytest.raises(ValueError, match="must both be bfloat16 or both float16"):
        scaled_gemm(a, w.half(), one, one, torch.float32)
    with pytest.raises(ValueError, match="must share K"):
        scaled_gemm(a, w[:, :16].contiguous(), one, one, torch.float32)
    with pytest.raises(ValueError, match="row_scale must be a float32 tensor of 1 or 3 elements"):
        scaled_gemm(a, w, torch.ones(2), one, torch.float32)
    with pytest.raises(ValueError, match="col_scale"):
        scaled_gemm(a, w, one, torch.ones(5, dtype=torch.float64), torch.float32)
    with pytest.raises(ValueError, match="bias must be a contiguous \\[5\\]"):
        scaled_gemm(a, w, one, one, torch.float32, bias=torch.zeros(4))
    with pytest.raises(ValueError, match="out_dtype"):
        scaled_gemm(a, w, one, one, torch.float64)
    with pytest.raises(ValueError, match="config needs block_k a multiple of 16"):
        scaled_gemm(a, w, one, one, torch.float32, config=GemmConfig(16, 16, 24, 4, 1))


def test_scaled_gemm_handles_empty_shapes_without_launching() -> None:
    pytest.importorskip("triton")
    from kernels.scaled_gemm import scaled_gemm

    a, w = torch.zeros(0, 32, dtype=torch.bfloat16), torch.zeros(5, 32, dtype=torch.bfloat16)
    assert scaled_gemm(a, w, torch.ones(1), torch.ones(1), torch.float32).shape == (0, 5)
    bias = torch.arange(5.0)
    out = scaled_gemm(torch.zeros(2, 0, dtype=torch.bfloat16), torch.zeros(5, 0, dtype=torch.bfloat16),
                      torch.ones(1), torch.ones(1), torch.float32, bias=bias)
    assert torch.equal(out, bias.expand(2, 5))
