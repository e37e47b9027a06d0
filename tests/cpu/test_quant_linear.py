"""QuantLinear on CPU (reference backend) and the precision choice."""

import pytest
import torch
import torch.nn.functional as F

from mixquant_serve.quant import fp8, nvfp4
from mixquant_serve.quant.linear import QuantLinear
from mixquant_serve.quant.precision import default_compute_dtype, resolve_precision

IN_FEATURES, OUT_FEATURES, TOKENS = 256, 96, 32


def make_layer(precisions: list[str], bias: bool = False, dtype: torch.dtype = torch.float32,
               seed: int = 0) -> tuple[QuantLinear, torch.Tensor, torch.Tensor | None]:
    """A prepared layer with gaussian weights, plus copies of its dense weight and bias."""
    g = torch.Generator().manual_seed(seed)
    layer = QuantLinear(IN_FEATURES, OUT_FEATURES, bias=bias, dtype=dtype)
    weight = (torch.randn(OUT_FEATURES, IN_FEATURES, generator=g) / 16).to(dtype)
    layer.weight.copy_(weight)
    bias_values = torch.randn(OUT_FEATURES, generator=g).to(dtype) if bias else None
    if bias:
        layer.bias.copy_(bias_values)
    layer.prepare(precisions)
    return layer, weight, bias_values


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


# Measured on these seeds: nvfp4 ~0.133 (weight or activation alone ~0.094), fp8 ~0.036 (alone ~0.026).
# The windows fail if quantization is skipped on either operand or broken.
@pytest.mark.parametrize(("precision", "low", "high"), [("nvfp4", 0.115, 0.16), ("fp8", 0.031, 0.045)])
def test_quantized_forward_error_window(precision: str, low: float, high: float) -> None:
    for seed in range(3):
        layer, weight, _ = make_layer([precision], seed=seed)
        x = torch.randn(TOKENS, IN_FEATURES, generator=torch.Generator().manual_seed(100 + seed))
        error = relative_error(layer(x, precision), F.linear(x, weight))
        assert low < error < high, f"{precision} seed {seed}: relative error {error:.4f} outside ({low}, {high})"


@pytest.mark.parametrize(("precision", "fmt"), [("nvfp4", nvfp4), ("fp8", fp8)])
def test_forward_is_dequantized_matmul(precision: str, fmt) -> None:
    layer, weight, bias = make_layer(["bf16", precision], bias=True)
    x = torch.randn(2, 5, IN_FEATURES, generator=torch.Generator().manual_seed(1))
    x2d = x.reshape(10, IN_FEATURES)
    # activations: one scale per token (nvfp4: a per-row global scale; fp8: row scales by definition)
    x_hat = fmt.dequantize(fmt.quantize(x2d, nvfp4.row_encode_scales(x2d)) if fmt is nvfp4 else fmt.quantize(x2d))
    expected = F.linear(x_hat, fmt.dequantize(fmt.quantize(weight)), bias).reshape(2, 5, OUT_FEATURES)
    actual = layer(x, precision)
    assert actual.shape == (2, 5, OUT_FEATURES) and actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_quantized_forward_of_a_token_does_not_depend_on_its_batch() -> None:
    """What prefix caching and continuous batching need: a token's quantized activations are its own.

    The quantized values are compared bit for bit; the matmul outputs only to fp32 rounding, because
    BLAS sums in a different order for 1 row than for 6.
    """
    from mixquant_serve.quant.linear import quantize_activation

    x = torch.randn(6, IN_FEATURES) * torch.tensor([[0.01], [1.0], [50.0], [1.0], [3.0], [0.2]])
    for precision, fmt in (("nvfp4", nvfp4), ("fp8", fp8)):
        layer, _, _ = make_layer([precision])
        together = fmt.dequantize(quantize_activation(x, precision))
        outputs = layer(x, precision)
        for row in range(6):
            alone = fmt.dequantize(quantize_activation(x[row : row + 1], precision))[0]
            assert torch.equal(alone, together[row]), f"{precision} row {row}"
            torch.testing.assert_close(layer(x[row : row + 1], precision)[0], outputs[row], rtol=1e-4, atol=1e-4)


def test_bf16_forward_is_plain_linear() -> None:
    layer, weight, bias = make_layer(["bf16", "nvfp4"], bias=True)
    x = torch.randn(TOKENS, IN_FEATURES)
    torch.testing.assert_close(layer(x, "bf16"), F.linear(x, weight, bias), rtol=0, atol=0)
    assert layer.weight is not None


def test_dense_weight_freed_without_bf16() -> None:
    layer, _, _ = make_layer(["nvfp4", "fp8"], bias=True)
    assert layer.weight is None
    assert "weight" not in dict(layer.named_parameters())
    assert set(layer.state_dict()) == {"bias"}  # quantized buffers are not checkpoint entries
    with pytest.raises(ValueError, match="'bf16' was not prepared"):
        layer(torch.randn(4, IN_FEATURES), "bf16")
    assert layer(torch.randn(4, IN_FEATURES), "nvfp4").shape == (4, OUT_FEATURES)


def test_unprepared_precision_errors() -> None:
    fresh = QuantLinear(IN_FEATURES, OUT_FEATURES)
    with pytest.raises(ValueError, match="not prepared"):
        fresh(torch.randn(4, IN_FEATURES), "bf16")
    layer, _, _ = make_layer(["nvfp4"])
    with pytest.raises(ValueError, match=r"'fp8' was not prepared .*\['nvfp4'\]"):
        layer(torch.randn(4, IN_FEATURES), "fp8")
    with pytest.raises(ValueError, match="int8"):
        layer(torch.randn(4, IN_FEATURES), "int8")
    with pytest.raises(ValueError, match="in_features"):
        layer(torch.randn(4, IN_FEATURES + 1), "nvfp4")
    with pytest.raises(RuntimeError, match="already"):
        layer.prepare(["nvfp4"])
    with pytest.raises(ValueError, match="precision"):
        QuantLinear(16, 16).prepare(["int4"])
    with pytest.raises(ValueError, match="at least one"):
        QuantLinear(16, 16).prepare([])


def test_weight_bytes() -> None:
    layer, _, _ = make_layer(["bf16", "fp8", "nvfp4"], dtype=torch.bfloat16)
    dense = layer.weight_bytes("bf16")
    assert dense == OUT_FEATURES * IN_FEATURES * 2
    assert layer.weight_bytes("nvfp4") == OUT_FEATURES * IN_FEATURES // 2 + OUT_FEATURES * IN_FEATURES // 16 + 4
    assert 0.28 < layer.weight_bytes("nvfp4") / dense < 0.285  # 4.5 bits per weight over 16
    assert layer.weight_bytes("fp8") == OUT_FEATURES * IN_FEATURES + OUT_FEATURES * 4
    with pytest.raises(ValueError, match="not prepared"):
        make_layer(["nvfp4"])[0].weight_bytes("bf16")


def test_resolve_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu) == "nvfp4"
    assert resolve_precision("fp8", cpu) == "fp8"
    for capability, expected in [((10, 0), "nvfp4"), ((12, 0), "nvfp4"), ((9, 0), "fp8"), ((8, 9), "fp8"),
                                 ((8, 0), "bf16")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert resolve_precision("auto", cuda) == expected, capability
        assert resolve_precision("bf16", cuda) == "bf16"
    with pytest.raises(ValueError, match="choice"):
        resolve_precision("int4", cpu)


def test_default_compute_dtype() -> None:
    assert default_compute_dtype(torch.device("cpu")) == torch.float32
    assert default_compute_dtype(torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="device"):
        default_compute_dtype(torch.device("meta"))
