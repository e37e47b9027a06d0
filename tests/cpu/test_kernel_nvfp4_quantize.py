"""The Triton NVFP4 quantize kernel under the Triton interpreter (CPU), bit-exact with the reference.

The interpreter must be switched on before the kernel's module is decorated, i.e. before
`kernels.nvfp4_quantize` is first imported, and pytest imports every test module (and whatever
they import) before running any test. Setting TRITON_INTERPRET inside this process would therefore
depend on import order across modules, and would leak into every other test. So the kernel runs
in a child Python with TRITON_INTERPRET=1 in its environment; the launcher's argument checks,
which never launch, run here.
"""

import pytest
import torch
from tests.interpret import run_interpreted


INTERPRETED_CHECK = r"""
import torch
from kernels.nvfp4_quantize import nvfp4_quantize
from mixquant_serve.quant import nvfp4


def near_ties(x):
    # every element but each block's amax moved to m * s / gs, m an E2M1 midpoint: x * (gs / s)
    # then lands within ulps of a tie, where any other fp32 operation order rounds differently.
    m, k = x.shape
    q = nvfp4.quantize(x)
    scale = q.block_scale.float().repeat_interleave(16, dim=1)
    midpoints = torch.tensor([p for p, _ in nvfp4.E2M1_MIDPOINTS])
    near = (midpoints[torch.arange(m * k).reshape(m, k) % 7] * torch.sign(x) * scale) / q.global_scale
    is_amax = x.abs().reshape(m, k // 16, 16).argmax(-1, keepdim=True) == torch.arange(16)
    return torch.where(is_amax.reshape(m, k), x, near)


def cases():
    g = torch.Generator().manual_seed(0)
    for m, k in [(1, 1), (3, 17), (2, 33), (1, 48), (2, 600)]:  # 600: two programs per row, tail masked
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            yield f"randn {m}x{k} {dtype}", torch.randn(m, k, generator=g).to(dtype), None
    magnitude = torch.exp2(torch.randint(-24, 9, (4, 5), generator=g).float()).repeat_interleave(16, dim=1)
    yield "blocks spanning 2^-24..2^8", torch.randn(4, 80, generator=g) * magnitude, None
    yield "near ties", near_ties(torch.randn(4, 64, generator=g)), None
    zeros = torch.randn(3, 40, generator=g)
    zeros[1] = 0.0
    zeros[2, 16:32] = 0.0
    yield "zero row and zero block", zeros, None
    yield "all zeros", torch.zeros(2, 20), None
    yield "saturating calibrated scale", torch.randn(3, 50, generator=g), torch.tensor(5000.0)
    rows = torch.randn(4, 72, generator=g) * torch.tensor([[1e-4], [1.0], [300.0], [0.0]])
    yield "per-row global scales", rows, nvfp4.row_encode_scales(rows)
    # with gs = 6 the block scale before rounding is the block amax: put e4m3 ties there
    ties = torch.tensor([1.0625, 1.1875, 17.0, 19.0, 232.0, 432.0, 464.0, 2.0**-10, 3 * 2.0**-10, 5 * 2.0**-10])
    tie_blocks = torch.zeros(2, len(ties), 16)
    tie_blocks[0, :, 3] = ties
    tie_blocks[1, :, 9] = -ties
    tie_blocks[:, :, 0] = ties / 3
    yield "e4m3 scale ties", tie_blocks.reshape(2, -1), torch.tensor(6.0)


def mismatches(actual, expected):
    bad = (actual != expected).nonzero()
    return f"{len(bad)} differ, first {bad[:8].tolist()}: got {actual[tuple(bad[:8].T)].tolist()} " \
           f"expected {expected[tuple(bad[:8].T)].tolist()}" if len(bad) else ""


failures = []
for name, x, global_scale in cases():
    gs = nvfp4.global_encode_scale(x) if global_scale is None else global_scale
    reference = nvfp4.quantize(x, gs)
    packed, block_scale = nvfp4_quantize(x, gs)
    for what, actual, expected in [("packed", packed, reference.packed),
                                   ("block_scale", block_scale.view(torch.uint8), reference.block_scale.view(torch.uint8))]:
        if actual.shape != expected.shape:
            failures.append(f"{name} {what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
        elif message := mismatches(actual, expected):
            failures.append(f"{name} {what}: {message}")

# A NaN global scale (what global_encode_scale gives for non-finite input) yields NaN scales everywhere.
x = torch.randn(2, 40)
x[1, 3] = float("inf")
packed, block_scale = nvfp4_quantize(x, nvfp4.global_encode_scale(x))
if not (block_scale.view(torch.uint8) == 0x7F).all() or ((packed & 0x77) != 0).any():
    failures.append(f"NaN global scale: block_scale {block_scale.view(torch.uint8).tolist()}")

print("\n".join(failures) if failures else "all cases bit-exact")
raise SystemExit(1 if failures else 0)
"""


def test_kernel_matches_reference_under_interpreter() -> None:
    stdout = run_interpreted(INTERPRETED_CHECK)
    assert "all cases bit-exact" in stdout, stdout[-4000:]


def test_launcher_rejects_bad_arguments() -> None:
    pytest.importorskip("triton")
    from kernels.nvfp4_quantize import nvfp4_quantize

    gs = torch.tensor(1.0)
    with pytest.raises(ValueError, match="x must be a contiguous 2-D"):
        nvfp4_quantize(torch.randn(4, 32).t(), gs)
    with pytest.raises(ValueError, match="x must be a contiguous 2-D"):
        nvfp4_quantize(torch.randn(2, 4, 32), gs)
    with pytest.raises(ValueError, match="x must be float32"):
        nvfp4_quantize(torch.randn(4, 32, dtype=torch.float64), gs)
    with pytest.raises(ValueError, match="global_scale"):
        nvfp4_quantize(torch.randn(4, 32), torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="global_scale"):
        nvfp4_quantize(torch.randn(4, 32), torch.ones(2))
