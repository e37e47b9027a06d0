"""FP8 prefill linear on CUDA: the Triton per-token quantize kernel bit-exact with the reference
(odd shapes, every input dtype, ties, zero rows, strided rows, poisoned outputs), and QuantLinear's
fp8 backend (kernel + torch._scaled_mm) against reference_linear."""

import pytest
import torch

from mixquant_serve.quant import fp8
from mixquant_serve.quant.linear import (FP8_SCALED_MM_MIN_CAPABILITY, QuantLinear, reference_linear,
                                         scaled_mm_fp8_linear, select_backend)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(1, 1), (3, 17), (17, 4096), (300, 14336), (5, 20000), (64, 1000)]  # 20000: the two-pass path
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def has_fp8_scaled_mm() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= FP8_SCALED_MM_MIN_CAPABILITY


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    actual = actual.cpu().contiguous().view(torch.uint8)
    expected = expected.cpu().contiguous().view(torch.uint8)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = (actual != expected).nonzero()
    if len(bad):
        first = tuple(bad[:8].T)
        pytest.fail(f"{what}: {len(bad)} of {actual.numel()} bytes differ; first indices {bad[:8].tolist()}, "
                    f"got {actual[first].tolist()}, expected {expected[first].tolist()}")


def kernel_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The launcher after same-sized blocks were filled with garbage and freed: the caching allocator
    hands the kernel poisoned output memory, so every element must be written."""
    from kernels.fp8_quantize import fp8_quantize

    garbage = [torch.full(x.shape, 0x7F, dtype=torch.uint8, device=x.device),
               torch.full((x.shape[0], 1), float("nan"), device=x.device)]
    del garbage
    return fp8_quantize(x)


def check_quantize(x: torch.Tensor, what: str) -> None:
    expected = fp8.quantize(x.cpu())
    data, scale = kernel_quantize(x)
    assert_bits_equal(scale, expected.scale, f"{what} scale")
    assert_bits_equal(data, expected.data, f"{what} data")


@pytest.mark.skipif(not has_fp8_scaled_mm(), reason="Triton's e4m3 cast needs sm_89+")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_kernel_bit_exact_on_gaussian(shape: tuple[int, int], dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(shape[0] * 7919 + shape[1])
    check_quantize(torch.randn(shape, generator=g).to(dtype).cuda(), f"randn {shape} {dtype}")


@pytest.mark.skipif(not has_fp8_scaled_mm(), reason="Triton's e4m3 cast needs sm_89+")
def test_quantize_kernel_bit_exact_on_edge_data() -> None:
    g = torch.Generator().manual_seed(1)
    magnitude = torch.exp2(torch.randint(-40, 40, (64, 1), generator=g).float())
    check_quantize((torch.randn(64, 512, generator=g) * magnitude).cuda(), "rows over 2^-40..2^40")
    # amax 448 gives scale 1: x / scale is x itself, so these land exactly on e4m3 ties (and subnormal ties)
    ties = torch.tensor([448.0, 1.0625, 1.1875, 17.0, 19.0, 232.0, 3 * 2.0**-10, 5 * 2.0**-10, -1.0625, -19.0])
    check_quantize(ties.reshape(1, -1).repeat(3, 1).cuda(), "e4m3 ties")
    check_quantize(ties.reshape(1, -1).bfloat16().cuda(), "e4m3 ties bf16")
    zeros = torch.randn(16, 300, generator=g)
    zeros[3] = 0.0
    zeros[9] = 2.0**-70  # below the amax floor
    check_quantize(zeros.cuda(), "zero and tiny rows")
    wide = torch.randn(40, 700, generator=g).cuda()
    check_quantize(wide[:, 13:613], "strided rows")


def test_select_backend_on_this_gpu() -> None:
    backend = select_backend("fp8", torch.device("cuda"))
    assert backend is (scaled_mm_fp8_linear if has_fp8_scaled_mm() else reference_linear)


def make_layer(n: int, k: int, bias: bool, seed: int) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    layer = QuantLinear(k, n, bias=bias, dtype=torch.bfloat16, device=torch.device("cuda"))
    layer.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
    if bias:
        layer.bias.copy_(torch.randn(n, generator=g))
    layer.prepare(["fp8"])
    assert layer.weight_fp8_data.shape == (n, k) and layer.weight_fp8_scale.shape == (n, 1)
    return layer


@pytest.mark.skipif(not has_fp8_scaled_mm(), reason="torch._scaled_mm FP8 needs sm_89+")
@pytest.mark.parametrize("m", [1, 17, 300])
@pytest.mark.parametrize("n,k,bias", [(32, 64, True), (4096, 4096, False), (48, 4096, True), (1024, 14336, False)])
def test_scaled_mm_backend_matches_reference(m: int, n: int, k: int, bias: bool) -> None:
    layer = make_layer(n, k, bias, seed=m + n + k)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).cuda()
    garbage = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    del garbage
    y = layer(x, "fp8")
    reference = reference_linear(x.float(), layer, "fp8")  # fp32 output
    assert y.dtype == torch.bfloat16 and y.shape == (m, n) and torch.isfinite(y).all()
    error = ((y.float() - reference).norm() / reference.norm()).item()
    # bf16 rounding of the output is ~2^-9 relative per element; the fp32 sums may differ in order
    assert error < 4e-3, error
    torch.testing.assert_close(y.float(), reference, rtol=1.6e-2, atol=1e-2 * reference.abs().max().item())


@pytest.mark.skipif(not has_fp8_scaled_mm(), reason="torch._scaled_mm FP8 needs sm_89+")
def test_unaligned_and_fp32_inputs_take_the_reference() -> None:
    layer = make_layer(24, 40, bias=True, seed=0)  # K = 40 is not a multiple of 16
    x = torch.randn(7, 40, dtype=torch.bfloat16, device="cuda")
    assert torch.equal(scaled_mm_fp8_linear(x, layer, "fp8"), reference_linear(x, layer, "fp8"))
    layer = make_layer(32, 64, bias=False, seed=1)
    x32 = torch.randn(5, 64, device="cuda")
    assert torch.equal(scaled_mm_fp8_linear(x32, layer, "fp8"), reference_linear(x32, layer, "fp8"))


@pytest.mark.skipif(not has_fp8_scaled_mm(), reason="torch._scaled_mm FP8 needs sm_89+")
def test_non_finite_activation_gives_nan_row() -> None:
    layer = make_layer(64, 128, bias=False, seed=2)
    x = torch.randn(6, 128, dtype=torch.bfloat16, device="cuda")
    x[1, 5] = float("inf")
    x[4, 7] = float("nan")
    y = layer(x, "fp8")
    assert torch.isnan(y[1]).all() and torch.isnan(y[4]).all()
    assert torch.isfinite(y[[0, 2, 3, 5]]).all()
