"""Quantize one activation row held in registers: the shared tail of the fused prologue kernels.

No launcher: these are @triton.jit helpers that kernels/rmsnorm_quantize.py and
kernels/silu_mul_quantize.py call after computing a row `z` (fp32 values of the bf16/fp16 activation
the unfused model would have written, zeros past K). The math is the references' in the same fp32
order, so the bits equal fp8.quantize / nvfp4.quantize(z, nvfp4.row_encode_scales(z)) of that row:

- fp8 (mixquant_serve/quant/fp8.py): scale = div_rn(max(amax, 2**-64), 448); data = e4m3(clamp(div_rn(z, scale))),
  the cast of kernels/fp8_quantize.py (sm_89+).
- nvfp4 (mixquant_serve/quant/nvfp4.py): gs = div_rn(2688, max(amax, 2**-64)), NaN when the row holds
  NaN/Inf; then per 16-element block the e4m3 scale and e2m1 nibbles of kernels/nvfp4_quantize.py
  (integer arithmetic, exact on any GPU and under the interpreter).
"""

import triton
import triton.language as tl

from kernels.fp8_quantize import _quantize_values
from kernels.nvfp4_quantize import _e2m1_nibble, _e4m3_round

AMAX_FLOOR = tl.constexpr(2.0**-64)
FP8_MAX = tl.constexpr(448.0)
NVFP4_ENCODE = tl.constexpr(2688.0)  # 448 * 6


@triton.jit
def _fp8_quantize_row(z, cols, K, data_row_ptr, scale_ptr):
    """z: fp32 [BLOCK] (zeros past K) -> stores e4m3 data at data_row_ptr + cols (cols < K) and the decode scale."""
    amax = tl.max(tl.abs(z), axis=0)
    scale = tl.div_rn(tl.maximum(amax, AMAX_FLOOR), FP8_MAX)
    tl.store(data_row_ptr + cols, _quantize_values(z, scale), mask=cols < K)
    tl.store(scale_ptr, scale)


@triton.jit
def _nvfp4_quantize_row(z, NUM_BLOCKS, packed_row_ptr, block_scale_row_ptr, global_scale_ptr,
                        BLOCK: tl.constexpr):
    """z: fp32 [BLOCK] (zeros past K, BLOCK a multiple of 16) -> stores the row's packed nibbles
    [NUM_BLOCKS * 8], e4m3 block scale bits [NUM_BLOCKS] and its encode scale gs."""
    # NaN counts as Inf, so a row holding either gets a NaN gs (row_encode_scales' rule).
    amax = tl.max(tl.where(z == z, tl.abs(z), float("inf")), axis=0)
    gs = tl.div_rn(tl.full((), NVFP4_ENCODE, tl.float32), tl.maximum(amax, AMAX_FLOOR))
    gs = tl.where(amax < float("inf"), gs, float("nan"))

    NB: tl.constexpr = BLOCK // 16
    blocks = tl.reshape(z, (NB, 16))
    block_amax = tl.max(tl.abs(blocks), axis=1)  # [NB]
    scale_raw = tl.minimum(tl.div_rn(block_amax * gs, 6.0), 448.0)
    scale, scale_code = _e4m3_round(scale_raw)
    scale_code = tl.where(gs == gs, scale_code, 0x7F)  # a NaN gs stores NaN scales and +-0 nibbles
    has_scale = tl.where(gs == gs, scale, 0.0) > 0.0
    factor = tl.where(has_scale, tl.div_rn(gs, tl.where(has_scale, scale, 1.0)), 0.0)
    nibbles = _e2m1_nibble(blocks * factor[:, None])  # [NB, 16]
    low, high = tl.split(tl.reshape(nibbles, (NB, 8, 2)))  # even, odd: [NB, 8]
    packed = (low | (high << 4)).to(tl.uint8)

    block_ids = tl.arange(0, NB)
    in_range = block_ids < NUM_BLOCKS
    packed_cols = block_ids[:, None] * 8 + tl.arange(0, 8)[None, :]
    tl.store(packed_row_ptr + packed_cols, packed, mask=in_range[:, None])
    tl.store(block_scale_row_ptr + block_ids, scale_code.to(tl.uint8), mask=in_range)
    tl.store(global_scale_ptr, gs)
