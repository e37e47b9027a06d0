"""FP8 e4m3 per-row reference: ties, saturation, zero rows, odd shapes, and bit-for-bit agreement
with ml_dtypes' float8_e4m3fn cast."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from mixquant_serve.quant import fp8


def assert_bits_equal(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    bad = np.argwhere(actual != expected)
    if len(bad):
        pytest.fail(f"{what}: {len(bad)} of {actual.size} differ; first indices {bad[:8].tolist()}, "
                    f"got {actual[tuple(bad[:8].T)]}, expected {expected[tuple(bad[:8].T)]}")


def check_against_ml_dtypes(x: torch.Tensor) -> None:
    q = fp8.quantize(x)
    x_np = x.float().numpy()
    amax = np.abs(x_np).max(axis=-1, keepdims=True, initial=np.float32(0))
    scale = np.maximum(amax, np.float32(2.0**-64)) / np.float32(448)
    data = np.clip(x_np / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    assert_bits_equal(q.scale.numpy().view(np.uint32), scale.view(np.uint32), "scale")
    assert_bits_equal(q.data.view(torch.uint8).numpy(), data.view(np.uint8), "data")
    decoded = data.astype(np.float32) * scale
    assert_bits_equal(fp8.dequantize(q).numpy().view(np.uint32), decoded.view(np.uint32), "dequantized")


# (input, expected e4m3 value) with scale 1: ties go to the even mantissa.
E4M3_CASES = [
    (1.0, 1.0), (1.0625, 1.0), (1.1875, 1.25), (17.0, 16.0), (19.0, 20.0), (240.0, 240.0), (232.0, 224.0),
    (float(np.nextafter(np.float32(1.0625), np.float32(2))), 1.125), (448.0, 448.0), (460.0, 448.0),
    (1000.0, 448.0),  # saturates
    (2.0**-10, 0.0), (3 * 2.0**-10, 2.0**-8), (2.0**-9, 2.0**-9), (2.0**-6 - 2.0**-12, 2.0**-6),
]


def test_e4m3_ties_and_saturation() -> None:
    inputs = torch.tensor([v for v, _ in E4M3_CASES] + [-v for v, _ in E4M3_CASES])
    expected = torch.tensor([e for _, e in E4M3_CASES] + [-e for _, e in E4M3_CASES])
    q = fp8.quantize(inputs, torch.ones(1))
    got = fp8.dequantize(q)
    bad = (got != expected).nonzero().flatten().tolist()
    assert not bad, [(inputs[i].item(), got[i].item(), expected[i].item()) for i in bad]


def test_row_scales_and_zero_rows() -> None:
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -896.0, 3.0], [0.5, 0.25, -0.125]])
    q = fp8.quantize(x)
    assert q.scale.shape == (3, 1)
    assert q.scale[1].item() == 2.0 and q.scale[2].item() == float(np.float32(0.5) / np.float32(448))
    assert q.scale[0].item() > 0 and math.isfinite(q.scale[0].item())
    decoded = fp8.dequantize(q)
    assert torch.equal(decoded[0], torch.zeros(3))
    assert decoded[1, 1].item() == -896.0  # the row's amax is exact
    assert torch.isfinite(decoded).all()


@pytest.mark.parametrize("shape", [(1,), (17,), (0, 17), (1, 1), (3, 33), (2, 3, 17), (3, 0)])
def test_odd_shapes(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(shape[-1]))
    q = fp8.quantize(x)
    assert q.data.shape == x.shape and q.scale.shape == shape[:-1] + (1,)
    decoded = fp8.dequantize(q, torch.bfloat16)
    assert decoded.shape == x.shape and decoded.dtype == torch.bfloat16
    check_against_ml_dtypes(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_random_inputs_match_ml_dtypes(dtype: torch.dtype) -> None:
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        check_against_ml_dtypes(torch.randn(16, 96, generator=g).to(dtype))
        # per-element magnitudes 2^-12..2^4 inside a row: e4m3 subnormals and underflow to zero
        spread = torch.randn(16, 96, generator=g) * torch.exp2(torch.randint(-12, 5, (16, 96), generator=g).float())
        check_against_ml_dtypes(spread.to(dtype))


def test_explicit_scale_saturates() -> None:
    x = torch.tensor([[1.0, -2.0, 1000.0]])
    q = fp8.quantize(x, torch.tensor([[1.0 / 256]]))
    torch.testing.assert_close(fp8.dequantize(q), torch.tensor([[1.0, -1.75, 1.75]]), rtol=0, atol=0)


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
def test_non_finite_input_names_the_tensor(bad_value: float) -> None:
    x = torch.randn(4, 8)
    x[1, 3] = bad_value
    with pytest.raises(ValueError, match="mlp.up_proj weight"):
        fp8.quantize(x, name="mlp.up_proj weight")


@pytest.mark.parametrize("scale", [torch.zeros(4, 1), torch.full((4, 1), math.nan), torch.ones(4),
                                   torch.ones(4, 1, dtype=torch.float64), -torch.ones(4, 1)])
def test_bad_scale(scale: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="scale"):
        fp8.quantize(torch.randn(4, 8), scale)
