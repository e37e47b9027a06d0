"""NVFP4 block values to bf16: values[r, k] = e2m1(q[r, k]) * e4m3(s[r, k // 16]), the global scale not applied.

The pure-torch reference is mixquant_serve.quant.nvfp4.block_values. The product of a 2-significant-bit
E2M1 value and a 4-significant-bit E4M3 scale has at most 6 significant bits and a magnitude in
[2**-10, 2688] (or 0), so it is exact in fp32 and stays exact when stored as bf16 (8 significant bits,
fp32's exponent range): this decode loses nothing, and a bf16 tensor-core GEMM of two decoded
operands, accumulated in fp32 and scaled by 1 / (gs_a * gs_w) at the end, gives the reference
product up to summation order.

Why a separate pass: Hopper has no FP4 tensor cores, and decoding inside the GEMM costs CUDA-core
work on every K step of every output tile (docs/perf-notes.md, runs 2-3: 335 TFLOP/s at best).
Decoding each operand once per call into a bf16 scratch tensor is a memory-bound pass (read 0.56,
write 2 bytes a value) after which the GEMM runs at dense bf16 speed; at prefill sizes the pass
costs a few percent of the GEMM. Storage stays packed: the scratch lives only for one call.

The decode is integer arithmetic on the bits (no fp8/fp4 casts, so any GPU and the Triton
interpreter agree): E2M1 code c = (e, m) is m * 0.5 for e = 0, else 2**(e - 1) * (1 + m / 2);
E4M3 (e, m) is m * 2**-9 for e = 0, else 2**(e - 7) * (1 + m / 8). The NaN code 0x7F reads as 480:
only a NaN global scale writes it, and the GEMM's 1 / gs is then NaN too.
"""

import torch
import triton
import triton.language as tl

BLOCK_SIZE = 16  # elements per block scale
BYTES_PER_BLOCK = 8
BLOCKS_PER_PROGRAM = 64  # 1024 values a program along K
ROWS_PER_PROGRAM = 4


@triton.jit
def _e2m1_value(nibble):
    """int32 nibble (sign << 3 | code) -> fp32 E2M1 value, exact."""
    exponent = (nibble >> 1) & 3
    mantissa = nibble & 1
    normal = ((exponent + 126) << 23) | (mantissa << 22)
    magnitude = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.5, normal.to(tl.float32, bitcast=True))
    return tl.where((nibble & 8) != 0, -magnitude, magnitude)


@triton.jit
def _e4m3_value(bits):
    """int32 E4M3 bits of a non-negative scale -> fp32, exact (0x7F, NaN, reads as 480)."""
    exponent = (bits >> 3) & 15
    mantissa = bits & 7
    normal = ((exponent + 120) << 23) | (mantissa << 20)
    return tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal.to(tl.float32, bitcast=True))


@triton.jit
def _nvfp4_decode_kernel(
    packed_ptr,  # [R, NUM_BLOCKS * 8] uint8
    scale_ptr,  # [R, NUM_BLOCKS] uint8 (E4M3 bits)
    out_ptr,  # [R, NUM_BLOCKS * 16] bf16 / fp16
    R,
    NUM_BLOCKS,
    ROWS: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    blocks = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)  # [BLOCKS]
    in_range = (rows < R)[:, None, None] & (blocks < NUM_BLOCKS)[None, :, None]  # [ROWS, BLOCKS, 1]
    row_offsets = rows.to(tl.int64)[:, None, None]
    byte_cols = blocks[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]  # [1, BLOCKS, 8]
    packed = tl.load(packed_ptr + row_offsets * (NUM_BLOCKS * 8) + byte_cols, mask=in_range, other=0).to(tl.int32)
    scale_bits = tl.load(scale_ptr + row_offsets * NUM_BLOCKS + blocks[None, :, None], mask=in_range, other=0)
    scale = _e4m3_value(scale_bits.to(tl.int32))  # [ROWS, BLOCKS, 1]
    low = (_e2m1_value(packed & 0xF) * scale).to(out_ptr.dtype.element_ty)  # even elements
    high = (_e2m1_value(packed >> 4) * scale).to(out_ptr.dtype.element_ty)  # odd elements
    values = tl.reshape(tl.join(low, high), (ROWS, BLOCKS, 16))  # [ROWS, BLOCKS, 16], interleaved
    cols = blocks[None, :, None] * 16 + tl.arange(0, 16)[None, None, :]
    tl.store(out_ptr + row_offsets * (NUM_BLOCKS * 16) + cols, values, mask=in_range)


def nvfp4_decode(packed: torch.Tensor, block_scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """packed: uint8 [R, Kp/2] and block_scale: float8_e4m3fn [R, Kp/16], both contiguous ->
    [R, Kp] in out_dtype (bf16 or fp16): q * s, equal to nvfp4.block_values exactly.

    out: an [R, Kp] contiguous tensor of out_dtype to write into (a reused scratch buffer), or None.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 2 or not packed.is_contiguous():
        raise ValueError(f"packed must be a contiguous 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)} "
                         f"strides {packed.stride()}")
    if packed.shape[1] % BYTES_PER_BLOCK != 0:
        raise ValueError(f"packed must have a multiple of 8 bytes a row, got {packed.shape[1]}")
    rows, num_blocks = packed.shape[0], packed.shape[1] // BYTES_PER_BLOCK
    if (block_scale.dtype != torch.float8_e4m3fn or tuple(block_scale.shape) != (rows, num_blocks)
            or not block_scale.is_contiguous() or block_scale.device != packed.device):
        raise ValueError(f"block_scale must be a contiguous float8_e4m3fn tensor of shape {(rows, num_blocks)} on "
                         f"{packed.device}, got {block_scale.dtype} {tuple(block_scale.shape)} on {block_scale.device}")
    if out_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"out_dtype must be bfloat16 or float16, got {out_dtype}")
    shape = (rows, num_blocks * BLOCK_SIZE)
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=packed.device)
    elif out.dtype != out_dtype or tuple(out.shape) != shape or not out.is_contiguous() or out.device != packed.device:
        raise ValueError(f"out must be a contiguous {out_dtype} tensor of shape {shape} on {packed.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if rows == 0 or num_blocks == 0:
        return out
    blocks = min(BLOCKS_PER_PROGRAM, triton.next_power_of_2(num_blocks))
    grid = (triton.cdiv(rows, ROWS_PER_PROGRAM), triton.cdiv(num_blocks, blocks))
    _nvfp4_decode_kernel[grid](packed, block_scale.view(torch.uint8), out, rows, num_blocks,
                               ROWS=ROWS_PER_PROGRAM, BLOCKS=blocks, num_warps=4)
    return out
