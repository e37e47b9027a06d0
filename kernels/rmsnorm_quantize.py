"""RMSNorm in one launch: optionally after the residual add, and optionally fused with the per-token
activation quantization of the linear that reads it (fp8 or nvfp4).

One program per row. The row is read once, normalized (and quantized) in registers; for a quantized
output the bf16 output of the norm is never written (the unfused path writes it, then reads it back
to quantize it). With a residual update `delta` (the previous sublayer's output) the row is first
x = dtype(x + delta), which is written back as the new residual stream, as the model's unfused
`x = x + delta` rounds it. The math is the references' (mixquant_serve/quant/activation.py
add_rms_norm / rms_norm, then fp8.quantize or nvfp4.quantize with per-row encode scales):

    x = dtype(float(x) + float(delta))            with a residual update; stored as the new residual
    x32 = float(x);  r = rsqrt(sum(x32^2) * (1 / K) + eps)
    z   = dtype(weight * dtype(x32 * r))          two roundings to x's dtype, as the model's RMSNorm does
    quantize z per row                            kernels/row_quantize.py, bit-exact given z
                                                  (or store z in x's dtype: the "plain" launchers)

Only r is not bit-reproducible: the fp32 summation order of the squares differs from torch's, and
rsqrt is the hardware approximation (rsqrt.approx.f32, as CUDA's rsqrtf that torch calls; numpy's
1 / sqrt under the interpreter); so z may differ from the unfused z by one bf16 ulp in rare
elements. Given z, the quantized bits are exact. The plain launchers also take fp32 rows (the
quantized ones bf16/fp16 only).

Rows up to MAX_K elements (a row in registers); longer rows take the unfused path.
"""

import torch
import triton
import triton.language as tl

from kernels.row_quantize import _fp8_quantize_row, _nvfp4_quantize_row

MAX_K = 16384
NVFP4_BLOCK = 16
PLAIN, FP8, NVFP4 = 0, 1, 2  # OUT_FORMAT of the kernel


@triton.jit
def _rmsnorm_quantize_kernel(
    x_ptr,  # [M, K] fp32/bf16/fp16, unit stride along K
    delta_ptr,  # [M, K] x's dtype, unit stride along K: the residual update (HAS_DELTA)
    residual_ptr,  # [M, K] x's dtype, contiguous: x + delta is stored here (HAS_DELTA)
    weight_ptr,  # [K], x's dtype
    out_ptr,  # plain: [M, K] x's dtype; fp8: data [M, K] e4m3; nvfp4: packed [M, NUM_BLOCKS * 8] uint8
    scale_ptr,  # fp8: [M] fp32 decode scales; nvfp4: block scales [M, NUM_BLOCKS] uint8; plain: unused
    global_scale_ptr,  # nvfp4: [M] fp32 encode scales; otherwise unused
    eps,
    inv_k,  # 1 / K in fp32: the mean as torch takes it (sum times the reciprocal count)
    K,
    NUM_BLOCKS,  # nvfp4: ceil(K / 16)
    stride_x_row,
    stride_delta_row,
    OUT_FORMAT: tl.constexpr,  # PLAIN, FP8 or NVFP4
    HAS_DELTA: tl.constexpr,
    BLOCK: tl.constexpr,  # power of two >= K (and >= 16)
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x_row + cols, mask=cols < K, other=0.0)
    if HAS_DELTA:
        delta = tl.load(delta_ptr + row * stride_delta_row + cols, mask=cols < K, other=0.0)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(x.dtype)
        tl.store(residual_ptr + row * K + cols, x, mask=cols < K)
    x32 = x.to(tl.float32)
    r = tl.rsqrt(tl.sum(x32 * x32, axis=0) * inv_k + eps)
    normalized = (x32 * r).to(x.dtype)
    weight = tl.load(weight_ptr + cols, mask=cols < K, other=0.0)
    z = (weight.to(tl.float32) * normalized.to(tl.float32)).to(x.dtype)
    if OUT_FORMAT == 0:
        tl.store(out_ptr + row * K + cols, z, mask=cols < K)
    elif OUT_FORMAT == 2:
        _nvfp4_quantize_row(z.to(tl.float32), NUM_BLOCKS, out_ptr + row * (NUM_BLOCKS * 8),
                            scale_ptr + row * NUM_BLOCKS, global_scale_ptr + row, BLOCK)
    else:
        _fp8_quantize_row(z.to(tl.float32), cols, K, out_ptr + row * K, scale_ptr + row)


def _dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    """(float32, bfloat16, float16) -> "float32, bfloat16 or float16"."""
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _check(x: torch.Tensor, weight: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if x.dim() != 2 or (x.shape[1] > 1 and x.stride(1) != 1):
        raise ValueError(f"x must be 2-D with unit stride along K, got shape {tuple(x.shape)} strides {x.stride()}")
    if x.dtype not in dtypes:
        raise ValueError(f"x must be {_dtype_names(dtypes)}, got {x.dtype}")
    if not 0 < x.shape[1] <= MAX_K:
        raise ValueError(f"x rows must have 1..{MAX_K} elements, got {x.shape[1]}")
    if weight.dtype != x.dtype or tuple(weight.shape) != (x.shape[1],) or not weight.is_contiguous() \
            or weight.device != x.device:
        raise ValueError(f"weight must be a contiguous {x.dtype} tensor of shape ({x.shape[1]},) on {x.device}, got "
                         f"{weight.dtype} {tuple(weight.shape)} on {weight.device}")


def _check_delta(x: torch.Tensor, delta: torch.Tensor) -> None:
    if delta.shape != x.shape or delta.dtype != x.dtype or delta.device != x.device \
            or (delta.shape[1] > 1 and delta.stride(1) != 1):
        raise ValueError(f"delta must be a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device} with unit "
                         f"stride along K, got {delta.dtype} {tuple(delta.shape)} strides {delta.stride()} "
                         f"on {delta.device}")


QUANTIZED_DTYPES = (torch.bfloat16, torch.float16)
PLAIN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _num_warps(block: int) -> int:
    """One warp per 1024 values (4 warps for a 4096-wide row: 0.045 ms at 8192 rows on an H100, within
    10% of 2, 8 or 16 warps)."""
    return max(1, min(16, block // 1024))


def _launch(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, out: torch.Tensor,
            scale: torch.Tensor, global_scale: torch.Tensor, out_format: int) -> torch.Tensor | None:
    """Runs the kernel over x's rows; returns the new residual x + delta (None without delta)."""
    m, k = x.shape
    residual = torch.empty_like(x, memory_format=torch.contiguous_format) if delta is not None else None
    if m > 0:
        block = max(16, triton.next_power_of_2(k))
        _rmsnorm_quantize_kernel[(m,)](
            x, x if delta is None else delta, x if residual is None else residual, weight, out, scale, global_scale,
            float(eps), 1.0 / k, k, triton.cdiv(k, NVFP4_BLOCK) if out_format == NVFP4 else 0, x.stride(0),
            0 if delta is None else delta.stride(0), OUT_FORMAT=out_format, HAS_DELTA=delta is not None,
            BLOCK=block, num_warps=_num_warps(block))
    return residual


def rmsnorm_plain(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [M, K] fp32/bf16/fp16 (unit stride along K), weight: [K] x's dtype -> rms_norm(x, weight, eps) [M, K]."""
    _check(x, weight, PLAIN_DTYPES)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, None, weight, eps, out, out, out, PLAIN)
    return out


def add_rmsnorm_plain(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, delta: [M, K] fp32/bf16/fp16 -> (residual, out): residual = x + delta, out = rms_norm(residual,
    weight, eps), both [M, K] in x's dtype (activation.add_rms_norm)."""
    _check(x, weight, PLAIN_DTYPES)
    _check_delta(x, delta)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    residual = _launch(x, delta, weight, eps, out, out, out, PLAIN)
    return residual, out


def _fp8_outputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    return (torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device),
            torch.empty(m, 1, dtype=torch.float32, device=x.device))


def _nvfp4_outputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, k = x.shape
    num_blocks = triton.cdiv(k, NVFP4_BLOCK)
    return (torch.empty(m, num_blocks * NVFP4_BLOCK // 2, dtype=torch.uint8, device=x.device),
            torch.empty(m, num_blocks, dtype=torch.float8_e4m3fn, device=x.device),
            torch.empty(m, 1, dtype=torch.float32, device=x.device))


def rmsnorm_quantize_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] bf16/fp16 (unit stride along K), weight: [K] -> data float8_e4m3fn [M, K] and scale
    float32 [M, 1]: fp8.quantize(rms_norm(x, weight, eps)) (see the module docstring for the one caveat)."""
    _check(x, weight, QUANTIZED_DTYPES)
    data, scale = _fp8_outputs(x)
    _launch(x, None, weight, eps, data, scale, scale, FP8)
    return data, scale


def add_rmsnorm_quantize_fp8(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, delta: [M, K] bf16/fp16 -> (residual, data, scale): residual = x + delta [M, K] in x's dtype,
    then rmsnorm_quantize_fp8 of it."""
    _check(x, weight, QUANTIZED_DTYPES)
    _check_delta(x, delta)
    data, scale = _fp8_outputs(x)
    residual = _launch(x, delta, weight, eps, data, scale, scale, FP8)
    return residual, data, scale


def rmsnorm_quantize_nvfp4(x: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [M, K] bf16/fp16 (unit stride along K), weight: [K] -> packed uint8 [M, Kp/2], block_scale
    float8_e4m3fn [M, Kp/16] and global_scale float32 [M, 1]: nvfp4.quantize(z, row_encode_scales(z))
    of z = rms_norm(x, weight, eps)."""
    _check(x, weight, QUANTIZED_DTYPES)
    packed, block_scale, global_scale = _nvfp4_outputs(x)
    _launch(x, None, weight, eps, packed, block_scale.view(torch.uint8), global_scale, NVFP4)
    return packed, block_scale, global_scale


def add_rmsnorm_quantize_nvfp4(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                               eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, delta: [M, K] bf16/fp16 -> (residual, packed, block_scale, global_scale): residual = x + delta
    [M, K] in x's dtype, then rmsnorm_quantize_nvfp4 of it."""
    _check(x, weight, QUANTIZED_DTYPES)
    _check_delta(x, delta)
    packed, block_scale, global_scale = _nvfp4_outputs(x)
    residual = _launch(x, delta, weight, eps, packed, block_scale.view(torch.uint8), global_scale, NVFP4)
    return residual, packed, block_scale, global_scale
