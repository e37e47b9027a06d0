"""NVFP4 quantization of a 2-D activation [M, K], bit-exact with mixquant_serve.quant.nvfp4.quantize.

Each program quantizes BLOCKS_PER_PROGRAM 16-element blocks of one row. The math is the
reference's, in the same fp32 order (see mixquant_serve/quant/nvfp4.py):

    s_raw = min(div_rn(bamax * gs, 6), 448);  s = e4m3(s_raw);  f = div_rn(gs, s) or 0 if s == 0
    nibble = e2m1(x * f), sign bit of x * f kept

Why no casts: Triton's fp32 -> fp8e4nv cast needs sm_89+ and the interpreter's emulation does not
round ties to even, and there is no e2m1 type. So e4m3 rounding is integer arithmetic on the fp32
bits and e2m1 rounding counts grid midpoints; both are exact, whatever the GPU. `/` in Triton may
lower to an approximate fp32 division (div.full.f32 on NVIDIA), hence `tl.div_rn`. The only multiply feeding an
add (the subnormal-rounding trick in `_e4m3_round`) multiplies by a power of two, so FMA
contraction cannot change the result.

A NaN global scale (global_encode_scale gives one for non-finite input) writes NaN block scales
(0x7F) everywhere: the launcher does not scan x for NaN/Inf (that would cost a host sync), but bad
input still decodes to NaN rather than to finite garbage.
"""

import torch
import triton
import triton.language as tl

BLOCK_SIZE = tl.constexpr(16)  # elements per block scale (a constexpr so the kernel may read it)
MAX_BLOCKS_PER_PROGRAM = 128  # 2048 elements a program: ~1.6-1.8 TB/s on an H200 at 8192 x 4096..14336 bf16


@triton.jit
def _e4m3_round(v):
    """v: fp32 in [0, 448] -> (value of e4m3(v) in fp32, its e4m3 bits as int32), ties to even."""
    bits = v.to(tl.int32, bitcast=True)
    # Normal e4m3 (v >= 2^-6): round the 23-bit fp32 mantissa to 3 bits; a carry bumps the exponent.
    rounded_bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
    normal_value = rounded_bits.to(tl.float32, bitcast=True)
    normal_code = (((rounded_bits >> 23) - 120) << 3) | ((rounded_bits >> 20) & 7)
    # Subnormal e4m3 (v < 2^-6): multiples of 2^-9. Adding then subtracting 2^23 rounds v * 512
    # (exact: a power-of-two product) to an integer with the hardware's ties-to-even.
    steps = (v * 512.0 + 8388608.0) - 8388608.0
    is_normal = v >= 0.015625
    value = tl.where(is_normal, normal_value, steps * 0.001953125)
    code = tl.where(is_normal, normal_code, steps.to(tl.int32))
    return value, code


@triton.jit
def _e2m1_nibble(y):
    """y: fp32 -> int32 nibble (sign << 3 | code); nearest on the E2M1 grid, ties to even, saturating.
    The code counts the midpoints below |y|; a tie counts only if the value above has an even code."""
    a = tl.abs(y)
    code = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32) +
            (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32))
    sign = (y.to(tl.int32, bitcast=True) >> 31) & 1
    return code | (sign << 3)


@triton.jit
def _nvfp4_quantize_kernel(
    x_ptr,  # [M, K] fp32/bf16/fp16, contiguous
    global_scale_ptr,  # [1] or [M] fp32
    packed_ptr,  # [M, Kp/2] uint8
    block_scale_ptr,  # [M, Kp/16] uint8 (bits of float8_e4m3fn)
    K,
    NUM_BLOCKS,  # Kp / 16
    GS_PER_ROW: tl.constexpr,  # one global scale per row (activations) instead of one per tensor
    BLOCKS_PER_PROGRAM: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    block_ids = tl.program_id(1) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)  # [B]
    cols = block_ids[:, None] * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)[None, :]  # [B, 16]
    # Columns past K are the zero padding of the reference.
    x = tl.load(x_ptr + row * K + cols, mask=cols < K, other=0.0).to(tl.float32)
    gs = tl.load(global_scale_ptr + row) if GS_PER_ROW else tl.load(global_scale_ptr)

    block_amax = tl.max(tl.abs(x), axis=1)  # [B]
    scale_raw = tl.minimum(tl.div_rn(block_amax * gs, 6.0), 448.0)
    scale, scale_code = _e4m3_round(scale_raw)
    # A NaN gs stores NaN scales (0x7F) and +-0 nibbles.
    scale_code = tl.where(gs == gs, scale_code, 0x7F)
    has_scale = tl.where(gs == gs, scale, 0.0) > 0.0
    factor = tl.where(has_scale, tl.div_rn(gs, tl.where(has_scale, scale, 1.0)), 0.0)

    nibbles = _e2m1_nibble(x * factor[:, None])  # [B, 16]
    low, high = tl.split(tl.reshape(nibbles, (BLOCKS_PER_PROGRAM, BLOCK_SIZE // 2, 2)))  # even, odd: [B, 8]
    packed = (low | (high << 4)).to(tl.uint8)

    in_range = block_ids < NUM_BLOCKS
    packed_cols = block_ids[:, None] * (BLOCK_SIZE // 2) + tl.arange(0, BLOCK_SIZE // 2)[None, :]  # [B, 8]
    tl.store(packed_ptr + row * (NUM_BLOCKS * (BLOCK_SIZE // 2)) + packed_cols, packed, mask=in_range[:, None])
    tl.store(block_scale_ptr + row * NUM_BLOCKS + block_ids, scale_code.to(tl.uint8), mask=in_range)


def nvfp4_quantize(x: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] contiguous fp32/bf16/fp16; global_scale: float32 on x's device, one element or [M, 1].

    Returns packed uint8 [M, Kp/2] and block_scale float8_e4m3fn [M, Kp/16], Kp = K rounded up to 16,
    equal bit for bit to mixquant_serve.quant.nvfp4.quantize(x, global_scale). Does not check x for
    NaN/Inf (no host sync); a NaN global_scale gives NaN block scales.
    """
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous 2-D tensor, got shape {tuple(x.shape)} strides {x.stride()}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    m, k = x.shape
    per_row = tuple(global_scale.shape) == (m, 1)
    if global_scale.dtype != torch.float32 or not (per_row or global_scale.numel() == 1) or global_scale.device != x.device:
        raise ValueError(f"global_scale must be a float32 tensor of one element or shape ({m}, 1) on {x.device}, "
                         f"got {global_scale.dtype} {tuple(global_scale.shape)} on {global_scale.device}")
    num_blocks = triton.cdiv(k, BLOCK_SIZE.value)
    packed = torch.empty(m, num_blocks * BLOCK_SIZE.value // 2, dtype=torch.uint8, device=x.device)
    block_scale = torch.empty(m, num_blocks, dtype=torch.float8_e4m3fn, device=x.device)
    if m == 0 or num_blocks == 0:
        return packed, block_scale
    blocks_per_program = min(triton.next_power_of_2(num_blocks), MAX_BLOCKS_PER_PROGRAM)
    grid = (m, triton.cdiv(num_blocks, blocks_per_program))
    _nvfp4_quantize_kernel[grid](
        x, global_scale.reshape(-1).contiguous(), packed, block_scale.view(torch.uint8), k, num_blocks,
        GS_PER_ROW=per_row, BLOCKS_PER_PROGRAM=blocks_per_program,
    )
    return packed, block_scale
