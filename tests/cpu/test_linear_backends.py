"""QuantLinear backend choice on CPU: the reference everywhere off CUDA, and the CUDA backends'
argument checks and fallbacks that need no GPU."""

import pytest
import torch

from mixquant_serve.quant.linear import (QuantLinear, reference_linear, scaled_mm_fp8_linear, select_backend,
                                         triton_nvfp4_linear)

CPU = torch.device("cpu")


@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_cpu_uses_the_reference(precision: str) -> None:
    assert select_backend(precision, CPU) is reference_linear


def test_select_backend_rejects_unquantized_precisions() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        select_backend("bf16", CPU)
    with pytest.raises(ValueError, match="precision must be one of"):
        select_backend("int4", CPU)


def test_backends_reject_the_other_precision() -> None:
    layer = QuantLinear(32, 16)
    layer.weight.normal_()
    layer.prepare(["fp8", "nvfp4"])
    x = torch.randn(3, 32)
    with pytest.raises(ValueError, match="runs precision 'fp8'"):
        scaled_mm_fp8_linear(x, layer, "nvfp4")
    with pytest.raises(ValueError, match="runs precision 'nvfp4'"):
        triton_nvfp4_linear(x, layer, "fp8")


def test_fp8_backend_takes_the_reference_for_fp32_or_unaligned_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    for in_features, out_features in [(32, 16), (40, 24)]:  # 40, 24: not multiples of 16
        layer = QuantLinear(in_features, out_features, bias=True)
        layer.weight.copy_(torch.randn(out_features, in_features, generator=g))
        layer.bias.copy_(torch.randn(out_features, generator=g))
        layer.prepare(["fp8"])
        x = torch.randn(5, in_features, generator=g)
        assert torch.equal(scaled_mm_fp8_linear(x, layer, "fp8"), reference_linear(x, layer, "fp8"))
