"""NVFP4 reference: rounding grid and ties, saturation, edge cases, and bit-for-bit agreement with
an independent implementation built on ml_dtypes' float8_e4m3fn and float4_e2m1fn casts."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from mixquant_serve.quant import nvfp4


def assert_bits_equal(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    bad = np.argwhere(actual != expected)
    if len(bad):
        pytest.fail(f"{what}: {len(bad)} of {actual.size} differ; first indices {bad[:8].tolist()}, "
                    f"got {actual[tuple(bad[:8].T)]}, expected {expected[tuple(bad[:8].T)]}")


def ml_dtypes_nvfp4(x: np.ndarray, gs: np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Independent NVFP4: x float32 [..., K] -> (packed uint8, block scale bits uint8, decoded float32)."""
    k = x.shape[-1]
    padded_k = -(-k // 16) * 16
    padded = np.zeros(x.shape[:-1] + (padded_k,), np.float32)
    padded[..., :k] = x
    blocks = padded.reshape(x.shape[:-1] + (padded_k // 16, 16))
    amax = np.abs(blocks).max(axis=-1, initial=np.float32(0))
    scale8 = np.minimum((amax * gs) / np.float32(6), np.float32(448)).astype(ml_dtypes.float8_e4m3fn)
    scale = scale8.astype(np.float32)
    factor = np.where(scale > 0, gs / np.where(scale > 0, scale, np.float32(1)), np.float32(0)).astype(np.float32)
    q = np.clip(blocks * factor[..., None], -6, 6).astype(ml_dtypes.float4_e2m1fn)
    nibbles = q.view(np.uint8).reshape(padded.shape)
    packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    decoded = ((q.astype(np.float32) * scale[..., None]) / gs).reshape(padded.shape)[..., :k]
    return packed, scale8.view(np.uint8), decoded


def ml_dtypes_global_scale(x: np.ndarray) -> np.float32:
    amax = np.abs(x).max(initial=np.float32(0))
    return np.float32(2688) / np.maximum(amax, np.float32(2.0**-64))


def check_against_ml_dtypes(x: torch.Tensor, global_scale: torch.Tensor | None = None) -> None:
    q = nvfp4.quantize(x, global_scale)
    x_np = x.float().numpy()
    gs = ml_dtypes_global_scale(x_np) if global_scale is None else np.float32(global_scale.item())
    assert_bits_equal(q.global_scale.numpy(), np.asarray(gs, np.float32), "global scale")
    packed, scale_bits, decoded = ml_dtypes_nvfp4(x_np, gs)
    assert_bits_equal(q.packed.numpy(), packed, "packed")
    assert_bits_equal(q.block_scale.view(torch.uint8).numpy(), scale_bits, "block scale")
    assert_bits_equal(nvfp4.dequantize(q).numpy().view(np.uint32), decoded.view(np.uint32), "dequantized")


def nextafter(value: float, direction: float) -> float:
    return float(np.nextafter(np.float32(value), np.float32(direction)))


# (input, expected E2M1 value) with the block scale exactly 1: grid points, every midpoint (ties to
# even) and the fp32 neighbours on both sides of each midpoint.
E2M1_CASES = [(v, v) for v in nvfp4.E2M1_GRID] + [
    (0.25, 0.0), (nextafter(0.25, 0), 0.0), (nextafter(0.25, 1), 0.5),
    (0.75, 1.0), (nextafter(0.75, 0), 0.5), (nextafter(0.75, 1), 1.0),
    (1.25, 1.0), (nextafter(1.25, 0), 1.0), (nextafter(1.25, 2), 1.5),
    (1.75, 2.0), (nextafter(1.75, 0), 1.5), (nextafter(1.75, 2), 2.0),
    (2.5, 2.0), (nextafter(2.5, 0), 2.0), (nextafter(2.5, 3), 3.0),
    (3.5, 4.0), (nextafter(3.5, 0), 3.0), (nextafter(3.5, 4), 4.0),
    (5.0, 4.0), (nextafter(5.0, 0), 4.0), (nextafter(5.0, 6), 6.0),
    (1e-30, 0.0), (0.1, 0.0), (0.6, 0.5), (2.9, 3.0), (4.9, 4.0), (5.9, 6.0),
]


def test_e2m1_grid_rounding_and_ties() -> None:
    # Each block holds 6.0 (so with gs = 1 its scale is e4m3(6 / 6) = 1 and y = x) and one case value.
    inputs = [v for v, _ in E2M1_CASES] + [-v for v, _ in E2M1_CASES]
    expected = [e for _, e in E2M1_CASES] + [-e for _, e in E2M1_CASES]
    x = torch.zeros(len(inputs), 16)
    x[:, 0] = 6.0
    x[:, 5] = torch.tensor(inputs)
    q = nvfp4.quantize(x, torch.tensor(1.0))
    assert torch.equal(q.block_scale.float(), torch.ones(len(inputs), 1))
    got = nvfp4.dequantize(q)[:, 5]
    bad = (got != torch.tensor(expected)).nonzero().flatten().tolist()
    assert not bad, [(inputs[i], got[i].item(), expected[i]) for i in bad]
    # the sign survives rounding to zero: -0.1 -> nibble 0b1000
    nibbles = nvfp4.unpack_nibbles(q.packed)[:, 5]
    assert torch.equal(nibbles >> 3, torch.tensor([0] * len(E2M1_CASES) + [1] * len(E2M1_CASES), dtype=torch.uint8))


def test_saturation_at_6_and_block_scale_at_448() -> None:
    # gs = 1 and amax 5376 ask for a block scale of 896: it clamps to 448, so y = x / 448 exceeds 6.
    values = torch.tensor([5376.0, -5376.0, 2688.0, 6.5 * 448, 5.5 * 448, 5.0 * 448, -7.0 * 448, 448.0])
    x = torch.zeros(1, 16)
    x[0, : len(values)] = values
    q = nvfp4.quantize(x, torch.tensor(1.0))
    assert q.block_scale.float().item() == 448.0
    expected = torch.tensor([6.0, -6.0, 6.0, 6.0, 6.0, 4.0, -6.0, 1.0]) * 448
    torch.testing.assert_close(nvfp4.dequantize(q)[0, : len(values)], expected, rtol=0, atol=0)


@pytest.mark.parametrize(("amax", "expected_scale"), [
    (1.0625, 1.0),  # tie between 1.0 and 1.125 -> even mantissa
    (1.1875, 1.25),  # tie between 1.125 and 1.25 -> even mantissa
    (464.0, 448.0),  # clamped (and a tie to 448 anyway)
    (1000.0, 448.0),  # clamped
    (2.0**-10, 0.0),  # half the smallest subnormal: tie to zero
    (3 * 2.0**-10, 2.0**-8),  # subnormal tie -> even
    (2.0**-6 - 2.0**-12, 2.0**-6),  # rounds up into the normal range
])
def test_block_scale_e4m3_rounding(amax: float, expected_scale: float) -> None:
    x = torch.zeros(16)
    x[3] = amax
    q = nvfp4.quantize(x, torch.tensor(6.0))  # s_raw = (amax * 6) / 6 = amax, exactly
    assert q.block_scale.float().item() == expected_scale
    decoded = nvfp4.dequantize(q)
    assert torch.isfinite(decoded).all()
    if expected_scale == 0.0:
        assert torch.equal(decoded, torch.zeros(16))


def test_zero_and_constant_blocks() -> None:
    x = torch.cat([torch.zeros(16), torch.full((16,), 3.0), torch.full((16,), -0.7), torch.full((16,), 1e-9)])
    q = nvfp4.quantize(x)
    decoded = nvfp4.dequantize(q)
    assert torch.isfinite(decoded).all()
    assert torch.equal(decoded[:16], torch.zeros(16))
    assert q.block_scale.float()[0].item() == 0.0
    assert q.block_scale.float()[3].item() == 0.0  # 1e-9 next to amax 3 underflows e4m3: decodes to zero
    assert torch.equal(decoded[48:], torch.zeros(16))
    torch.testing.assert_close(decoded[16:32], torch.full((16,), 3.0), rtol=1e-6, atol=0)  # the amax block
    assert torch.unique(decoded[32:48]).numel() == 1
    assert abs(decoded[32].item() + 0.7) <= 0.7 / 16  # within e4m3 rounding of the scale


def test_all_zero_tensor_has_finite_scale() -> None:
    q = nvfp4.quantize(torch.zeros(2, 32))
    assert q.global_scale.item() == 2688.0 * 2.0**64
    assert torch.equal(nvfp4.dequantize(q), torch.zeros(2, 32))


def test_global_encode_scale_marks_non_finite_input() -> None:
    assert nvfp4.global_encode_scale(torch.tensor([0.5, -2.0])).item() == 1344.0
    assert nvfp4.global_encode_scale(torch.zeros(0, 16)).item() == 2688.0 * 2.0**64
    for bad_value in (math.nan, math.inf, -math.inf):
        assert math.isnan(nvfp4.global_encode_scale(torch.tensor([1.0, bad_value], dtype=torch.bfloat16)).item())


@pytest.mark.parametrize("shape", [(1,), (17,), (0, 17), (1, 1), (3, 33), (2, 3, 17), (3, 0), (4, 48)])
def test_odd_shapes(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape) * 100 + shape[-1]))
    q = nvfp4.quantize(x)
    padded_k = -(-shape[-1] // 16) * 16
    assert q.packed.shape == shape[:-1] + (padded_k // 2,)
    assert q.block_scale.shape == shape[:-1] + (padded_k // 16,)
    assert q.shape == x.shape
    decoded = nvfp4.dequantize(q, torch.bfloat16)
    assert decoded.shape == x.shape and decoded.dtype == torch.bfloat16
    check_against_ml_dtypes(x)
    if x.numel() and shape[-1] % 16:  # the padding encodes as +0
        assert (nvfp4.unpack_nibbles(q.packed)[..., shape[-1]:] == 0).all()


def test_pack_unpack_round_trip() -> None:
    nibbles = torch.randint(0, 16, (3, 5, 34), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = nvfp4.pack_nibbles(nibbles)
    assert packed.shape == (3, 5, 17)
    assert torch.equal(nvfp4.unpack_nibbles(packed), nibbles)
    assert nvfp4.pack_nibbles(torch.tensor([0x1, 0xA], dtype=torch.uint8)).item() == 0xA1  # even -> low nibble


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
def test_non_finite_input_names_the_tensor(bad_value: float) -> None:
    x = torch.randn(4, 32)
    x[2, 7] = bad_value
    with pytest.raises(ValueError, match="layer3.q_proj activation"):
        nvfp4.quantize(x, name="layer3.q_proj activation")


@pytest.mark.parametrize("global_scale", [torch.tensor(0.0), torch.tensor(-1.0), torch.tensor(math.nan),
                                          torch.tensor(math.inf), torch.tensor(1.0, dtype=torch.float64),
                                          torch.ones(2)])
def test_bad_global_scale(global_scale: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="global_scale"):
        nvfp4.quantize(torch.randn(16), global_scale)


def test_bad_input_type() -> None:
    with pytest.raises(ValueError, match="w"):
        nvfp4.quantize(torch.ones(16, dtype=torch.int32), name="w")
    with pytest.raises(ValueError, match="x"):
        nvfp4.quantize(torch.tensor(1.0))


def random_blocks(rows: int, k: int, seed: int) -> torch.Tensor:
    """Gaussian values whose 16-blocks span 2^-24..2^8: e4m3 subnormal and underflowing scales included."""
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.exp2(torch.randint(-24, 9, (rows, -(-k // 16)), generator=g).float())
    return torch.randn(rows, k, generator=g) * magnitude.repeat_interleave(16, dim=1)[:, :k]


def grid_ties(rows: int, seed: int) -> torch.Tensor:
    """Blocks of power-of-two scale holding exact E2M1 midpoints and grid values: every element is a tie or exact."""
    g = torch.Generator().manual_seed(seed)
    points = torch.tensor([m for m, _ in nvfp4.E2M1_MIDPOINTS] + list(nvfp4.E2M1_GRID))
    values = points[torch.randint(0, len(points), (rows, 64), generator=g)]
    values[:, ::16] = 6.0
    sign = torch.where(torch.rand(rows, 64, generator=g) < 0.5, -1.0, 1.0)
    return values * sign * torch.exp2(torch.randint(-8, 8, (rows, 4), generator=g).float()).repeat_interleave(16, 1)


def near_ties(rows: int, seed: int) -> torch.Tensor:
    """Gaussian blocks whose elements, except each block's amax, are moved to m * s / gs for E2M1
    midpoints m: x * (gs / s) then lands within a few ulps of a tie, so any other fp32 operation
    order (or an inexact division) rounds some of them the other way."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 64, generator=g)
    q = nvfp4.quantize(x)
    scale = q.block_scale.float().repeat_interleave(16, dim=1)
    midpoints = torch.tensor([m for m, _ in nvfp4.E2M1_MIDPOINTS])
    signed = midpoints[torch.randint(0, len(midpoints), (rows, 64), generator=g)] * torch.sign(x)
    near = (signed * scale) / q.global_scale
    is_block_amax = x.abs().reshape(rows, 4, 16).argmax(-1, keepdim=True) == torch.arange(16)
    return torch.where(is_block_amax.reshape(rows, 64), x, near)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_random_inputs_match_ml_dtypes(dtype: torch.dtype) -> None:
    for seed in range(3):
        gaussian = torch.randn(8, 80, generator=torch.Generator().manual_seed(seed))
        check_against_ml_dtypes(gaussian.to(dtype))
        if dtype != torch.float16:  # the spread overflows fp16
            check_against_ml_dtypes(random_blocks(32, 72, seed).to(dtype))
        check_against_ml_dtypes(grid_ties(8, seed).to(dtype), torch.tensor(1.0))
        check_against_ml_dtypes(near_ties(16, seed).to(dtype))
        # a calibrated scale too large for the data: block scales clamp at 448 and values saturate
        check_against_ml_dtypes(gaussian.to(dtype), torch.tensor(5000.0))


def test_per_row_global_scale_quantizes_each_row_as_if_alone():
    """Activations use one global scale per token: a token's bits never depend on its batch."""
    x = torch.randn(5, 40) * torch.tensor([[1e-3], [1.0], [10.0], [100.0], [0.0]])
    gs = nvfp4.row_encode_scales(x)
    assert gs.shape == (5, 1)
    together = nvfp4.quantize(x, gs)
    decoded = nvfp4.dequantize(together)
    for row in range(5):
        alone = nvfp4.quantize(x[row : row + 1])
        assert torch.equal(together.packed[row], alone.packed[0]), row
        assert torch.equal(together.block_scale[row].view(torch.uint8), alone.block_scale[0].view(torch.uint8)), row
        assert torch.equal(decoded[row], nvfp4.dequantize(alone)[0]), row
    # a per-tensor scale, by contrast, ties the small rows to the largest row's amax
    per_tensor = nvfp4.quantize(x)
    assert not torch.equal(per_tensor.packed[0], together.packed[0])
    with pytest.raises(ValueError, match="global_scale"):
        nvfp4.quantize(x, torch.ones(4, 1))
