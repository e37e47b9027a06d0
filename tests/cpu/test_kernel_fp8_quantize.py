"""The Triton FP8 per-token quantize kernel under the Triton interpreter (child process: see
test_kernel_nvfp4_quantize.py), and the launcher's argument checks.

The interpreter's fp32 -> e4m3 cast is not the hardware's: it rounds ties away from zero and
drops the carry into the exponent (124.3 becomes 64, not 128). So here the kernel's scales must
equal the reference's bit for bit, and its e4m3 data must equal the interpreter's own cast of the
reference's pre-cast values clamp(x / scale, -448, 448): that checks everything the kernel computes
before the cast (amax, floor, both divisions, the clamp, masks, strides, the two-pass path for long
rows). tests/gpu/test_fp8_linear.py checks the data bit for bit against the reference on the GPU.
"""

import pytest
import torch
from tests.interpret import run_interpreted


INTERPRETED_CHECK = r"""
import torch
import triton
import triton.language as tl
from kernels.fp8_quantize import MAX_ROW_IN_REGISTERS, fp8_quantize
from mixquant_serve.quant import fp8


@triton.jit
def _cast_kernel(y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    y = tl.load(y_ptr + offsets, mask=offsets < n)
    tl.store(out_ptr + offsets, y.to(tl.float8e4nv), mask=offsets < n)


def interpreter_cast(y):
    out = torch.empty(y.shape, dtype=torch.float8_e4m3fn)
    _cast_kernel[(triton.cdiv(y.numel(), 1024),)](y.contiguous(), out, y.numel(), BLOCK=1024)
    return out


def cases():
    g = torch.Generator().manual_seed(0)
    for m, k in [(1, 1), (3, 17), (2, 100), (4, 4096), (2, MAX_ROW_IN_REGISTERS + 300)]:  # the last: two passes
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            yield f"randn {m}x{k} {dtype}", torch.randn(m, k, generator=g).to(dtype)
    magnitude = torch.exp2(torch.randint(-30, 30, (6, 1), generator=g).float())
    yield "rows over 2^-30..2^30", torch.randn(6, 64, generator=g) * magnitude
    zeros = torch.randn(3, 40, generator=g)
    zeros[1] = 0.0
    yield "zero row", zeros
    yield "tiny row below the floor", torch.full((2, 8), 2.0**-70)
    wide = torch.randn(5, 300, generator=g)
    yield "strided rows", wide[:, 10:110]


failures = []
for name, x in cases():
    expected = fp8.quantize(x)
    data, scale = fp8_quantize(x)
    pre_cast = (x.float() / expected.scale).clamp(-448.0, 448.0)
    if data.shape != x.shape or scale.shape != expected.scale.shape:
        failures.append(f"{name}: shapes {tuple(data.shape)} {tuple(scale.shape)}")
        continue
    if not torch.equal(scale.view(torch.int32), expected.scale.view(torch.int32)):
        failures.append(f"{name}: scale {scale.flatten().tolist()[:4]} != {expected.scale.flatten().tolist()[:4]}")
    bad = (data.view(torch.uint8) != interpreter_cast(pre_cast).view(torch.uint8)).nonzero()
    if len(bad):
        failures.append(f"{name}: {len(bad)} data bytes differ, first {bad[:4].tolist()}")
print("\n".join(failures) if failures else "all cases match")
raise SystemExit(1 if failures else 0)
"""


def test_kernel_matches_reference_under_interpreter() -> None:
    stdout = run_interpreted(INTERPRETED_CHECK)
    assert "all cases match" in stdout, stdout[-4000:]


def test_launcher_rejects_bad_arguments() -> None:
    pytest.importorskip("triton")
    from kernels.fp8_quantize import fp8_quantize

    with pytest.raises(ValueError, match="x must be 2-D with unit stride along K"):
        fp8_quantize(torch.randn(4, 32).t())
    with pytest.raises(ValueError, match="x must be 2-D with unit stride along K"):
        fp8_quantize(torch.randn(2, 4, 32))
    with pytest.raises(ValueError, match="x must be float32, bfloat16 or float16"):
        fp8_quantize(torch.randn(4, 32, dtype=torch.float64))


def test_empty_shapes_follow_the_reference_without_launching() -> None:
    pytest.importorskip("triton")
    from kernels.fp8_quantize import fp8_quantize
    from mixquant_serve.quant import fp8

    data, scale = fp8_quantize(torch.randn(0, 32))
    assert data.shape == (0, 32) and scale.shape == (0, 1)
    data, scale = fp8_quantize(torch.randn(3, 0))
    assert data.shape == (3, 0)
    assert torch.equal(scale, fp8.quantize(torch.randn(3, 0)).scale)
