"""Triton NVFP4 GEMM on CUDA: against the reference (decode both operands to fp32, fp32 matmul) on
odd shapes with poisoned outputs; both decoders bit-identical; autotuned and fixed tiles; bias,
output dtypes, NaN propagation; and QuantLinear's nvfp4 backend."""

import pytest
import torch

from mixquant_serve.quant import nvfp4
from mixquant_serve.quant.linear import QuantLinear, reference_linear, select_backend, triton_nvfp4_linear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MS = [1, 17, 300]
KS = [16, 48, 4096]
NS = [24, 4096]


def operands(m: int, n: int, k: int, seed: int, per_row_activations: bool = True) -> tuple[nvfp4.NVFP4Tensor, nvfp4.NVFP4Tensor]:
    """Fresh random activations and weights, quantized on the GPU (the Triton quantize kernel path)."""
    from kernels.nvfp4_quantize import nvfp4_quantize

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if m > 1 and k > 16:
        x[m // 2, 16:32] = 0.0  # a zero block
    w = torch.randn(n, k, generator=g) * 0.05
    quantized = []
    # activations: one global scale per row, as QuantLinear quantizes them; weights: one per tensor
    for t, per_row in ((x.cuda(), per_row_activations), (w.cuda(), False)):
        gs = nvfp4.row_encode_scales(t) if per_row else nvfp4.global_encode_scale(t)
        packed, block_scale = nvfp4_quantize(t, gs)
        quantized.append(nvfp4.NVFP4Tensor(packed=packed, block_scale=block_scale, global_scale=gs, shape=t.shape))
    return quantized[0], quantized[1]


def run_gemm(a: nvfp4.NVFP4Tensor, w: nvfp4.NVFP4Tensor, out_dtype: torch.dtype, **kwargs) -> torch.Tensor:
    """The launcher on poisoned memory: a freed NaN block of the output's size is what it allocates."""
    from kernels.nvfp4_gemm import nvfp4_gemm

    garbage = torch.full((a.shape[0], w.shape[0]), float("nan"), dtype=out_dtype, device="cuda")
    del garbage
    return nvfp4_gemm(a.packed, a.block_scale, a.global_scale, w.packed, w.block_scale, w.global_scale,
                      out_dtype=out_dtype, **kwargs)


def reference(a: nvfp4.NVFP4Tensor, w: nvfp4.NVFP4Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 reference product and the per-element sum of |products| (the scale of summation error)."""
    a_hat, w_hat = nvfp4.dequantize(a).double(), nvfp4.dequantize(w).double()
    return (a_hat @ w_hat.T).float(), (a_hat.abs() @ w_hat.abs().T).float()


def assert_matches_reference(out: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor, what: str) -> None:
    assert torch.isfinite(out).all(), f"{what}: non-finite (unwritten) outputs"
    # fp32 accumulation in another order: each sum is off by a few ulps of its sum of |terms|
    excess = (out.double() - expected.double()).abs() - 3e-6 * magnitude.double() - 1e-30
    bad = (excess > 0).nonzero()
    if len(bad):
        first = tuple(bad[:5].T)
        pytest.fail(f"{what}: {len(bad)} of {out.numel()} outputs off; first {bad[:5].tolist()}: got "
                    f"{out[first].tolist()}, expected {expected[first].tolist()}")


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("m", MS)
def test_autotuned_gemm_matches_reference(m: int, n: int, k: int) -> None:
    a, w = operands(m, n, k, seed=m * 131 + n * 7 + k)
    expected, magnitude = reference(a, w)
    out = run_gemm(a, w, torch.float32)
    assert out.shape == (m, n)
    assert_matches_reference(out, expected, magnitude, f"autotuned {m}x{n}x{k}")


@pytest.mark.parametrize("m,n,k", [(1, 24, 48), (17, 24, 48), (300, 200, 1000)])
def test_per_tensor_activation_scale_matches_reference(m: int, n: int, k: int) -> None:
    a, w = operands(m, n, k, seed=k + 1, per_row_activations=False)
    assert a.global_scale.dim() == 0
    expected, magnitude = reference(a, w)
    assert_matches_reference(run_gemm(a, w, torch.float32), expected, magnitude, f"per-tensor {m}x{n}x{k}")


@pytest.mark.parametrize("m,n,k", [(17, 24, 48), (300, 4096, 4096), (130, 200, 1000)])
def test_decoders_and_output_dtypes_agree_bit_for_bit(m: int, n: int, k: int) -> None:
    """Both decoders are exact, so on one tile shape (one summation order) they give the same bits,
    and bf16 / fp16 outputs are the fp32 output rounded."""
    from kernels.nvfp4_gemm import LARGE_M_CONFIGS, SMALL_CONFIG

    a, w = operands(m, n, k, seed=k)
    expected, magnitude = reference(a, w)
    bias = torch.randn(n, device="cuda")
    for config in (SMALL_CONFIG, LARGE_M_CONFIGS[0]):
        with_ptx = run_gemm(a, w, torch.float32, config=config, bias=bias)
        with_arith = run_gemm(a, w, torch.float32, config=config, bias=bias, decode_with_ptx=False)
        assert torch.equal(with_ptx, with_arith), f"{config}: decoders differ"
        assert_matches_reference(with_ptx - bias, expected, magnitude + bias.abs(), f"{config} {m}x{n}x{k}")
        for dtype in (torch.bfloat16, torch.float16):
            rounded = run_gemm(a, w, dtype, config=config, bias=bias)
            assert torch.equal(rounded, with_ptx.to(dtype)), f"{config} {dtype}: not the rounded fp32 output"


def test_nan_activation_scale_gives_nan_output() -> None:
    a, w = operands(8, 32, 64, seed=3)
    a_nan = nvfp4.NVFP4Tensor(packed=a.packed, block_scale=a.block_scale,
                              global_scale=torch.tensor(float("nan"), device="cuda"), shape=a.shape)
    assert torch.isnan(run_gemm(a_nan, w, torch.bfloat16)).all()


def test_quant_linear_backend_matches_reference() -> None:
    assert select_backend("nvfp4", torch.device("cuda")) is triton_nvfp4_linear
    g = torch.Generator().manual_seed(0)
    layer = QuantLinear(4096, 1024, bias=True, dtype=torch.bfloat16, device=torch.device("cuda"))
    layer.weight.copy_(torch.randn(1024, 4096, generator=g) * 0.02)
    layer.bias.copy_(torch.randn(1024, generator=g))
    layer.prepare(["nvfp4"])
    x = torch.randn(2, 150, 4096, generator=g).to(torch.bfloat16).cuda()
    y = layer(x, "nvfp4")
    assert y.dtype == torch.bfloat16 and y.shape == (2, 150, 1024)
    expected = reference_linear(x.reshape(-1, 4096), layer, "nvfp4").float().reshape(2, 150, 1024)
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)
    x32 = x.float()
    expected32 = reference_linear(x32.reshape(-1, 4096), layer, "nvfp4").reshape(2, 150, 1024)
    torch.testing.assert_close(layer(x32, "nvfp4"), expected32, rtol=1e-4, atol=1e-4)
