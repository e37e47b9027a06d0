"""The fused RMSNorm / SwiGLU + activation-quantize kernels under the Triton interpreter (CPU).

Bit-exact where the computed row itself is exact in every implementation (rows of +-2^e with
eps = 0, so rsqrt is a power of two; gates >= 20, where SiLU(g) = g in fp32), which checks the
weight multiply, both roundings and the fp8 / nvfp4 quantization of the row (fp16 rows: the
interpreter truncates fp32 -> bf16, and its e4m3 cast is its own, see test_kernel_fp8_quantize.py);
close (within a quantization step) on random rows and bf16, where summation order and exp/rsqrt
implementations may move the row by an ulp. tests/gpu/test_fused_prefill.py checks bf16 on the GPU
(bit for bit: random SwiGLU rows, exact RMSNorm rows; RMSNorm random rows within 2% of entries).
The kernels run in a child Python with TRITON_INTERPRET=1 (see
test_kernel_nvfp4_quantize.py for why); the launchers' argument checks run here.
"""

import pytest
import torch
from tests.interpret import run_interpreted


INTERPRETED_CHECK = r"""
import torch
import triton
import triton.language as tl
from kernels.rmsnorm_quantize import rmsnorm_quantize_fp8, rmsnorm_quantize_nvfp4
from kernels.silu_mul_quantize import silu_mul_quantize_fp8, silu_mul_quantize_nvfp4
from mixquant_serve.quant import fp8, nvfp4
from mixquant_serve.quant.activation import rms_norm, silu_mul

g = torch.Generator().manual_seed(0)
failures = []


@triton.jit
def _cast_kernel(y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, tl.load(y_ptr + offsets, mask=offsets < n).to(tl.float8e4nv), mask=offsets < n)


def interpreter_cast(y):
    # the interpreter's own fp32 -> e4m3 cast (ties away, carry dropped: see test_kernel_fp8_quantize.py)
    out = torch.empty(y.shape, dtype=torch.float8_e4m3fn)
    _cast_kernel[(triton.cdiv(y.numel(), 1024),)](y.contiguous(), out, y.numel(), BLOCK=1024)
    return out


def reference(z, fmt):
    # the unfused path: quantize the op's bf16/fp16 output per token
    if fmt == "fp8":
        q = fp8.quantize(z)
        pre_cast = (z.float() / q.scale).clamp(-448.0, 448.0)
        return {"data": interpreter_cast(pre_cast).view(torch.uint8), "scale": q.scale}
    q = nvfp4.quantize(z, nvfp4.row_encode_scales(z))
    return {"packed": q.packed, "block_scale": q.block_scale.view(torch.uint8), "global_scale": q.global_scale}


def fused(outputs, fmt):
    if fmt == "fp8":
        return {"data": outputs[0].view(torch.uint8), "scale": outputs[1]}
    return {"packed": outputs[0], "block_scale": outputs[1].view(torch.uint8), "global_scale": outputs[2]}


def decoded(q, fmt, k):
    if fmt == "fp8":
        return q["data"].view(torch.float8_e4m3fn).float() * q["scale"]
    t = nvfp4.NVFP4Tensor(packed=q["packed"], block_scale=q["block_scale"].view(torch.float8_e4m3fn),
                          global_scale=q["global_scale"], shape=torch.Size((q["packed"].shape[0], k)))
    return nvfp4.dequantize(t)


def compare(name, actual, expected, exact, fmt, k):
    if not exact:  # values within a quantization step (e4m3: 1/8; e2m1 at the top: 2 of 6) of the row's amax
        a, e = decoded(actual, fmt, k), decoded(expected, fmt, k)
        limit = (0.2 if fmt == "fp8" else 0.4) * e.abs().amax(dim=-1, keepdim=True)
        if not ((a - e).abs() <= limit).all():
            failures.append(f"{name}: decoded rows differ by up to {((a - e).abs() / limit).max():.2f} x the limit")
        return
    for key in expected:
        a, e = actual[key], expected[key]
        if a.shape != e.shape:
            failures.append(f"{name} {key}: shape {tuple(a.shape)} != {tuple(e.shape)}")
            continue
        same = (a == e) | (torch.isnan(a.float()) & torch.isnan(e.float()))
        if not same.all():
            bad = (~same).nonzero()[:6]
            failures.append(f"{name} {key}: {(~same).sum().item()} differ, first {bad.tolist()}: got "
                            f"{a[tuple(bad.T)].tolist()} expected {e[tuple(bad.T)].tolist()}")


# The interpreter rounds fp32 -> bf16 by truncation (the GPU rounds to nearest even), so the rows
# are exact only in fp16 here; bf16 runs are checked for closeness (and bit for bit on the GPU).
shapes = [(1, 16), (3, 48), (2, 100), (2, 600)]  # 100: K not a multiple of 16
for dtype in (torch.bfloat16, torch.float16):
    for m, k in shapes:
        weight = torch.randn(k, generator=g).to(dtype)
        # exact: each row +-2^e, eps = 0 -> the normalized row is +-1 exactly
        exponents = torch.randint(-6, 6, (m, 1), generator=g).float()
        x_exact = (torch.randint(0, 2, (m, k), generator=g).float() * 2 - 1) * torch.exp2(exponents)
        x_random = torch.randn(m, k, generator=g) * 3
        for label, x, eps, exact in (("exact", x_exact, 0.0, dtype == torch.float16),
                                     ("random", x_random, 1e-5, False)):
            x = x.to(dtype)
            z = rms_norm(x, weight, eps)
            compare(f"rmsnorm fp8 {label} {m}x{k} {dtype}", fused(rmsnorm_quantize_fp8(x, weight, eps), "fp8"),
                    reference(z, "fp8"), exact, "fp8", k)
            compare(f"rmsnorm nvfp4 {label} {m}x{k} {dtype}",
                    fused(rmsnorm_quantize_nvfp4(x, weight, eps), "nvfp4"), reference(z, "nvfp4"), exact, "nvfp4", k)
        # exact: gates of 20..60 (SiLU(g) = g in fp32) or 0; random: anything
        gate = torch.rand(m, k, generator=g) * 40 + 20
        gate[:, ::5] = 0.0
        up = torch.randn(m, k, generator=g)
        for label, gate_up, exact in (("exact", torch.cat([gate, up], 1), dtype == torch.float16),
                                      ("random", torch.randn(m, 2 * k, generator=g) * 4, False)):
            gate_up = gate_up.to(dtype)
            z = silu_mul(gate_up)
            compare(f"silu_mul fp8 {label} {m}x{k} {dtype}",
                    fused(silu_mul_quantize_fp8(gate_up, accurate_exp=False), "fp8"), reference(z, "fp8"), exact,
                    "fp8", k)
            compare(f"silu_mul nvfp4 {label} {m}x{k} {dtype}",
                    fused(silu_mul_quantize_nvfp4(gate_up, accurate_exp=False), "nvfp4"), reference(z, "nvfp4"),
                    exact, "nvfp4", k)

# strided rows (a view into a wider buffer) read the same as contiguous ones
wide = torch.randn(4, 96, generator=g).to(torch.bfloat16)
weight = torch.randn(64, generator=g).to(torch.bfloat16)
compare("rmsnorm strided", fused(rmsnorm_quantize_fp8(wide[:, :64], weight, 1e-6), "fp8"),
        fused(rmsnorm_quantize_fp8(wide[:, :64].contiguous(), weight, 1e-6), "fp8"), True, "fp8", 64)

# a row holding NaN gets a NaN global scale and NaN (0x7F) block scales; the other rows are untouched
x = torch.randn(3, 32, generator=g).to(torch.bfloat16)
x[1, 5] = float("nan")
packed, block_scale, global_scale = rmsnorm_quantize_nvfp4(x, torch.ones(32, dtype=torch.bfloat16), 1e-6)
if not (torch.isnan(global_scale[1]).all() and (block_scale.view(torch.uint8)[1] == 0x7F).all()):
    failures.append(f"NaN row: global_scale {global_scale.tolist()}, "
                    f"block_scale {block_scale.view(torch.uint8).tolist()}")
if torch.isnan(global_scale[[0, 2]]).any():
    failures.append(f"NaN leaked into other rows: {global_scale.tolist()}")

print("\n".join(failures) if failures else "all cases match")
raise SystemExit(1 if failures else 0)
"""


def test_kernels_match_reference_under_interpreter() -> None:
    stdout = run_interpreted(INTERPRETED_CHECK)
    assert "all cases match" in stdout, stdout[-4000:]


def test_launchers_reject_bad_arguments() -> None:
    pytest.importorskip("triton")
    from kernels.rmsnorm_quantize import MAX_K, rmsnorm_quantize_fp8, rmsnorm_quantize_nvfp4
    from kernels.silu_mul_quantize import silu_mul_quantize_fp8, silu_mul_quantize_nvfp4

    x = torch.randn(4, 32, dtype=torch.bfloat16)
    weight = torch.ones(32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="x must be 2-D with unit stride"):
        rmsnorm_quantize_fp8(x.t(), weight, 1e-6)
    with pytest.raises(ValueError, match="x must be bfloat16 or float16"):
        rmsnorm_quantize_nvfp4(x.float(), weight, 1e-6)
    with pytest.raises(ValueError, match="x rows must have"):
        rmsnorm_quantize_fp8(torch.zeros(1, MAX_K + 1, dtype=torch.bfloat16), torch.ones(MAX_K + 1), 1e-6)
    with pytest.raises(ValueError, match="weight must be a contiguous torch.bfloat16 tensor of shape \\(32,\\)"):
        rmsnorm_quantize_fp8(x, weight.float(), 1e-6)
    with pytest.raises(ValueError, match="weight must be"):
        rmsnorm_quantize_nvfp4(x, weight[:16], 1e-6)
    with pytest.raises(ValueError, match="gate_up must be 2-D"):
        silu_mul_quantize_fp8(x.t())
    with pytest.raises(ValueError, match="gate_up must be bfloat16 or float16"):
        silu_mul_quantize_nvfp4(x.float())
    with pytest.raises(ValueError, match="gate_up rows must hold 2 x"):
        silu_mul_quantize_fp8(torch.zeros(2, 33, dtype=torch.bfloat16))
