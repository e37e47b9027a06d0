"""FP8 E4M3 per-token quantization of a 2-D activation [M, K], bit-exact with mixquant_serve.quant.fp8.quantize.

One program per row. The math is the reference's, in the same fp32 order (mixquant_serve/quant/fp8.py):

    amax  = max |x| over the row                       exact: |x| of bf16/fp16/fp32 is exact in fp32
    scale = div_rn(max(amax, 2**-64), 448)             the stored decode scale, as torch._scaled_mm takes it
    data  = e4m3(clamp(div_rn(x, scale), -448, 448))   round to nearest, ties to even

`tl.div_rn` because `/` may lower to an approximate division (div.full.f32), and the reference
divides tensor by tensor (correctly rounded). The e4m3 cast is Triton's fp32 -> fp8e4nv conversion,
round to nearest even (cvt.rn.satfinite on sm_89+, the GPUs this backend runs on). The Triton
interpreter rounds ties away from zero instead: under it, only exact ties can differ.

A row of up to MAX_ROW_IN_REGISTERS elements is read once and kept in registers (one pass over x);
longer rows are read twice (amax, then quantize), the second read mostly from L2.

No NaN/Inf scan (that would cost a host sync per layer): a NaN element stays NaN (the clamp
propagates it), an Inf makes the row's scale Inf and itself NaN, so the row's GEMM output is NaN
rather than finite garbage.
"""

import torch
import triton
import triton.language as tl

E4M3_MAX = tl.constexpr(448.0)
AMAX_FLOOR = tl.constexpr(2.0**-64)
MAX_ROW_IN_REGISTERS = 16384  # 64 KB of fp32 a row: 32 values a thread at 16 warps
CHUNK = 4096  # elements a loop step for longer rows


@triton.jit
def _quantize_values(x, scale):
    """x: fp32 tensor, scale: fp32 scalar -> e4m3 values of clamp(x / scale, -448, 448)."""
    y = tl.div_rn(x, scale)
    y = tl.minimum(tl.maximum(y, -E4M3_MAX, propagate_nan=tl.PropagateNan.ALL), E4M3_MAX,
                   propagate_nan=tl.PropagateNan.ALL)
    return y.to(tl.float8e4nv)


@triton.jit
def _fp8_quantize_kernel(
    x_ptr,  # [M, K] fp32/bf16/fp16, unit stride along K
    data_ptr,  # [M, K] float8_e4m3fn, contiguous
    scale_ptr,  # [M] fp32 decode scales
    K,
    stride_x_row,
    BLOCK_K: tl.constexpr,  # power of two; covers the row when ROW_IN_REGISTERS
    ROW_IN_REGISTERS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x_row
    data_row = data_ptr + row * K
    cols = tl.arange(0, BLOCK_K)
    if ROW_IN_REGISTERS:
        x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
        scale = tl.div_rn(tl.maximum(amax, AMAX_FLOOR), E4M3_MAX)
        tl.store(data_row + cols, _quantize_values(x, scale), mask=cols < K)
    else:
        amax = tl.zeros((BLOCK_K,), tl.float32)
        for start in range(0, K, BLOCK_K):
            x = tl.load(x_row + start + cols, mask=start + cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.div_rn(tl.maximum(tl.max(amax, axis=0), AMAX_FLOOR), E4M3_MAX)
        for start in range(0, K, BLOCK_K):
            x = tl.load(x_row + start + cols, mask=start + cols < K, other=0.0).to(tl.float32)
            tl.store(data_row + start + cols, _quantize_values(x, scale), mask=start + cols < K)
    tl.store(scale_ptr + row, scale)


def fp8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] fp32/bf16/fp16 with unit stride along K (rows may be strided).

    Returns data float8_e4m3fn [M, K] (contiguous) and scale float32 [M, 1], equal bit for bit to
    mixquant_serve.quant.fp8.quantize(x) on finite input. Does not scan x for NaN/Inf (no host sync).
    """
    if x.dim() != 2 or (x.shape[1] > 1 and x.stride(1) != 1):
        raise ValueError(f"x must be 2-D with unit stride along K, got shape {tuple(x.shape)} strides {x.stride()}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    m, k = x.shape
    data = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m == 0:
        return data, scale
    if k == 0:  # the reference's empty-row rule: amax 0, floored, divided in fp32
        return data, torch.full_like(scale, AMAX_FLOOR.value) / torch.full_like(scale, E4M3_MAX.value)
    row_in_registers = k <= MAX_ROW_IN_REGISTERS
    block_k = triton.next_power_of_2(k) if row_in_registers else CHUNK
    num_warps = max(1, min(16, block_k // 1024))
    _fp8_quantize_kernel[(m,)](
        x, data, scale, k, x.stride(0),
        BLOCK_K=block_k, ROW_IN_REGISTERS=row_in_registers, num_warps=num_warps,
    )
    return data, scale
