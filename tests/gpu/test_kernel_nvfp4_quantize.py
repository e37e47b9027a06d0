"""Triton NVFP4 quantize kernel on CUDA: bit-exact with the CPU reference on odd shapes, all input
dtypes and edge data (ties, zero blocks, saturation), into poisoned output memory; plus the CUDA
activation path of QuantLinear, which uses the kernel."""

import pytest
import torch
import torch.nn.functional as F

from mixquant_serve.quant import nvfp4
from mixquant_serve.quant.linear import QuantLinear, quantize_activation

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(1, 1), (3, 17), (7, 33), (5, 100), (2, 16 * 40 + 5), (1000, 257), (33, 4099), (4096, 1024)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    actual, expected = actual.cpu().view(torch.uint8), expected.cpu().view(torch.uint8)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = (actual != expected).nonzero()
    if len(bad):
        first = tuple(bad[:8].T)
        pytest.fail(f"{what}: {len(bad)} of {actual.numel()} differ; first indices {bad[:8].tolist()}, "
                    f"got {actual[first].tolist()}, expected {expected[first].tolist()}")


def kernel_quantize(x: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the launcher after filling and freeing same-sized blocks with garbage, so the caching
    allocator hands the kernel poisoned output memory: every element must then be written."""
    from kernels.nvfp4_quantize import nvfp4_quantize

    m, k = x.shape
    padded_k = nvfp4.padded_size(k)
    garbage = [torch.full((m, padded_k // 2), 0xA5, dtype=torch.uint8, device=x.device),
               torch.full((m, padded_k // 16), 0x5A, dtype=torch.uint8, device=x.device)]
    del garbage
    return nvfp4_quantize(x, global_scale)


def check_case(x: torch.Tensor, global_scale: torch.Tensor | None, what: str) -> None:
    """Kernel on CUDA vs the reference on CPU, and the reference on CUDA vs on CPU."""
    x_cpu = x.cpu()
    gs_cpu = nvfp4.global_encode_scale(x_cpu) if global_scale is None else global_scale
    expected = nvfp4.quantize(x_cpu, gs_cpu)
    gs = gs_cpu.cuda()
    assert_bits_equal(nvfp4.global_encode_scale(x).reshape(1), nvfp4.global_encode_scale(x_cpu).reshape(1),
                      f"{what} global scale")
    packed, block_scale = kernel_quantize(x, gs)
    assert_bits_equal(packed, expected.packed, f"{what} kernel packed")
    assert_bits_equal(block_scale, expected.block_scale, f"{what} kernel block_scale")
    on_cuda = nvfp4.quantize(x, gs)
    assert_bits_equal(on_cuda.packed, expected.packed, f"{what} CUDA reference packed")
    assert_bits_equal(on_cuda.block_scale, expected.block_scale, f"{what} CUDA reference block_scale")
    decoded = nvfp4.dequantize(on_cuda).cpu().view(torch.int32)
    assert torch.equal(decoded, nvfp4.dequantize(expected).view(torch.int32)), f"{what}: CUDA dequantize differs"


def near_ties(x: torch.Tensor) -> torch.Tensor:
    """Every element but each block's amax moved to m * s / gs for E2M1 midpoints m, so x * (gs / s)
    lands within ulps of a tie: an inexact division or another operation order flips some."""
    m, k = x.shape
    q = nvfp4.quantize(x)
    scale = q.block_scale.float().repeat_interleave(16, dim=1)
    midpoints = torch.tensor([p for p, _ in nvfp4.E2M1_MIDPOINTS])
    near = (midpoints[torch.arange(m * k).reshape(m, k) % 7] * torch.sign(x) * scale) / q.global_scale
    is_amax = x.abs().reshape(m, k // 16, 16).argmax(-1, keepdim=True) == torch.arange(16)
    return torch.where(is_amax.reshape(m, k), x, near)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_bit_exact_on_gaussian(shape: tuple[int, int], dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(shape[0] * 7919 + shape[1])
    x = torch.randn(shape, generator=g).to(dtype).cuda()
    check_case(x, None, f"randn {shape} {dtype}")
    check_case(x, torch.tensor(5000.0), f"randn {shape} {dtype} saturating calibrated scale")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_bit_exact_on_edge_data(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    magnitude = torch.exp2(torch.randint(-24, 9, (256, 64), generator=g).float()).repeat_interleave(16, dim=1)
    check_case((torch.randn(256, 1024, generator=g) * magnitude).to(dtype).cuda(), None, "blocks over 2^-24..2^8")
    check_case(near_ties(torch.randn(512, 256, generator=g)).to(dtype).cuda(), None, "near ties")
    zeros = torch.randn(64, 100, generator=g)
    zeros[5] = 0.0
    zeros[7, 16:48] = 0.0
    check_case(zeros.to(dtype).cuda(), None, "zero row and blocks")
    check_case(torch.zeros(3, 40, dtype=dtype, device="cuda"), None, "all zeros")
    ties = torch.tensor([1.0625, 1.1875, 17.0, 19.0, 232.0, 432.0, 464.0, 2.0**-10, 3 * 2.0**-10, 5 * 2.0**-10])
    tie_blocks = torch.zeros(2, len(ties), 16)
    tie_blocks[0, :, 3] = ties
    tie_blocks[1, :, 9] = -ties
    tie_blocks[:, :, 0] = ties / 3
    check_case(tie_blocks.reshape(2, -1).to(dtype).cuda(), torch.tensor(6.0), "e4m3 scale ties")


def test_non_finite_activation_decodes_to_nan() -> None:
    x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    x[3, 5] = float("inf")
    decoded = nvfp4.dequantize(quantize_activation(x, "nvfp4"))
    # one global scale per token: the token holding Inf decodes to NaN, the others are untouched
    assert torch.isnan(decoded[3]).all()
    others = torch.cat([decoded[:3], decoded[4:]])
    assert torch.isfinite(others).all()
    expected = nvfp4.dequantize(quantize_activation(torch.cat([x[:3], x[4:]]), "nvfp4"))
    assert torch.equal(others, expected)


def test_quant_linear_cuda_matches_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(192, 320, generator=g) / 16, torch.randn(192, generator=g)
    x = torch.randn(3, 50, 320, generator=g)
    outputs = {}
    for device in ("cpu", "cuda"):
        layer = QuantLinear(320, 192, bias=True, device=torch.device(device))
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
        layer.prepare(["bf16", "nvfp4", "fp8"])
        assert ("weight_nvfp4_dequantized" in dict(layer.named_buffers())) == (device == "cpu")  # CPU-only cache
        outputs[device] = {p: layer(x.to(device), p).cpu() for p in ("bf16", "nvfp4", "fp8")}
        if device == "cuda":
            activation = quantize_activation(x.reshape(-1, 320).cuda(), "nvfp4")  # the kernel path
            x2d = x.reshape(-1, 320)
            expected = nvfp4.quantize(x2d, nvfp4.row_encode_scales(x2d))  # one global scale per token
            assert_bits_equal(activation.packed, expected.packed, "activation packed")
            assert_bits_equal(activation.block_scale, expected.block_scale, "activation block_scale")
    for precision in ("bf16", "nvfp4", "fp8"):
        torch.testing.assert_close(outputs["cuda"][precision], outputs["cpu"][precision], rtol=1e-4, atol=1e-4,
                                   msg=lambda m, p=precision: f"{p}: {m}")


def test_quant_linear_cuda_bf16_compute() -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 512, generator=g) / 16
    x = torch.randn(64, 512, generator=g)
    layer = QuantLinear(512, 256, dtype=torch.bfloat16, device=torch.device("cuda"))
    layer.weight.copy_(weight)
    layer.prepare(["nvfp4"])
    assert layer.weight is None
    y = layer(x.to(device="cuda", dtype=torch.bfloat16), "nvfp4")
    assert y.dtype == torch.bfloat16
    reference = F.linear(x, weight)
    error = ((y.float().cpu() - reference).norm() / reference.norm()).item()
    assert 0.115 < error < 0.16, error
