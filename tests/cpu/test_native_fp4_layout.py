"""The native FP4 backend's data layout, checked on CPU (sm_100+ GPUs are not available here).

to_blocked (reshapes) must agree with blocked_offset (cuBLAS's formula written out) and pad with
zeros; select_backend must pick native_fp4_linear from sm_100 on; and native_fp4_linear, run against
an emulation of torch._scaled_mm's block-scaled FP4 contract (float4_e2m1fn_x2 operands, low nibble
first, A row-major and B column-major along K, blocked E4M3 scales, fp32 output), must equal
reference_linear. The emulation decodes with its own table and un-swizzles with blocked_offset, so a
wrong nibble order, operand orientation, scale layout or global-scale placement fails here.
"""

import pytest
import torch

from mixquant_serve.quant import linear
from mixquant_serve.quant.blocked_scales import blocked_offset, blocked_shape, to_blocked
from mixquant_serve.quant.linear import QuantLinear, native_fp4_linear, reference_linear, triton_nvfp4_linear

E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (128, 4), (130, 5), (300, 64)])
def test_to_blocked_matches_the_cublas_formula(rows: int, cols: int) -> None:
    scales = torch.randint(1, 255, (rows, cols), dtype=torch.uint8)
    blocked = to_blocked(scales)
    padded_rows, padded_cols = blocked_shape(rows, cols)
    assert blocked.shape == (padded_rows * padded_cols,)
    r, c = torch.meshgrid(torch.arange(padded_rows), torch.arange(padded_cols), indexing="ij")
    offsets = blocked_offset(r, c, cols)
    assert sorted(offsets.flatten().tolist()) == list(range(padded_rows * padded_cols))  # a permutation
    inside = (r < rows) & (c < cols)
    assert torch.equal(blocked[offsets[inside]], scales.flatten())
    assert (blocked[offsets[~inside]] == 0).all()
    assert to_blocked(scales.view(torch.float8_e4m3fn)).view(torch.uint8).equal(blocked)


def test_blocked_offset_of_known_positions() -> None:
    # rows 0, 32, 64, 96 of a tile share one 16-byte row; the second column tile starts at byte 512
    assert blocked_offset(torch.tensor([0, 32, 64, 96, 1, 0, 128]), torch.tensor([0, 0, 0, 0, 0, 4, 0]),
                          8).tolist() == [0, 4, 8, 12, 16, 512, 1024]


def test_to_blocked_rejects_non_matrices() -> None:
    with pytest.raises(ValueError, match="scales must be 2-D"):
        to_blocked(torch.zeros(4))


def emulated_scaled_mm(a, b, scale_a, scale_b, out_dtype):
    """torch._scaled_mm's FP4 contract: a [M, K/2] row-major, b [K/2, N] column-major, blocked scales."""
    assert a.dtype == b.dtype == torch.float4_e2m1fn_x2 and out_dtype == torch.float32
    assert b.stride(0) == 1, "b must be column-major (K contiguous for each output column)"

    def decode(packed: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        rows, half_k = packed.shape
        nibbles = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(rows, 2 * half_k)  # low nibble first
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(2 * half_k // 16), indexing="ij")
        scales = blocked.view(torch.uint8)[blocked_offset(r, c, 2 * half_k // 16)].view(torch.float8_e4m3fn)
        return E2M1_VALUES[nibbles.long()] * scales.float().repeat_interleave(16, dim=1)

    a_values = decode(a.view(torch.uint8), scale_a)
    b_values = decode(b.t().view(torch.uint8), scale_b)  # [N, K]
    return a_values @ b_values.T


@pytest.mark.parametrize("parts", [None, (64, 32, 32)])
def test_native_fp4_linear_equals_the_reference_under_emulation(monkeypatch: pytest.MonkeyPatch, parts) -> None:
    g = torch.Generator().manual_seed(0)
    layer = QuantLinear(96, 128, bias=True, parts=parts)
    layer.weight.copy_(torch.randn(128, 96, generator=g) * torch.linspace(0.01, 3.0, 128).reshape(-1, 1))
    layer.bias.copy_(torch.randn(128, generator=g))
    layer.prepare(["nvfp4"])
    x = torch.randn(37, 96, generator=g) * 5
    monkeypatch.setattr(torch, "_scaled_mm", emulated_scaled_mm)
    assert torch.allclose(native_fp4_linear(x, layer, "nvfp4"), reference_linear(x, layer, "nvfp4"),
                          rtol=1e-5, atol=1e-4)


def test_native_fp4_is_selected_from_sm_100(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda", 0)
    for capability, nvfp4_backend, fp8_backend in [((10, 0), native_fp4_linear, linear.scaled_mm_fp8_linear),
                                                   ((9, 0), triton_nvfp4_linear, linear.scaled_mm_fp8_linear),
                                                   ((8, 0), triton_nvfp4_linear, reference_linear)]:
        monkeypatch.setattr(linear, "_cuda_capability", lambda index, capability=capability: capability)
        assert linear.select_backend("nvfp4", cuda) is nvfp4_backend
        assert linear.select_backend("fp8", cuda) is fp8_backend


def test_native_fp4_takes_the_triton_path_for_unaligned_k(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = QuantLinear(48, 32)  # K = 48: 24 packed bytes a row, not a multiple of 16
    layer.weight.normal_()
    layer.prepare(["nvfp4"])
    called = []
    monkeypatch.setattr(linear, "triton_nvfp4_linear", lambda x, layer, precision: called.append(True) or x)
    native_fp4_linear(torch.randn(2, 48), layer, "nvfp4")
    assert called
