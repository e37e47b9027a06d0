"""NVFP4 x NVFP4 GEMM for GPUs without FP4 tensor cores (sm_80 / sm_90): out = a @ w.T.

Both operands stay packed in memory (uint8, two E2M1 nibbles a byte, low nibble first; one E4M3
block scale per 16 elements along K; one fp32 encode scale per tensor, see
mixquant_serve/quant/nvfp4.py). Each program loads a [BLOCK_M, BLOCK_K] tile of `a` and a
[BLOCK_N, BLOCK_K] tile of `w` packed, decodes them in registers to fp16 and multiplies on the
tensor cores with fp32 accumulation:

    tile value = e2m1(q) * e4m3(s)           exact in fp16: at most 6 significant bits, 2**-10 <= |v| <= 2688
    acc       += a_tile @ w_tile.T           fp32 accumulation (each fp16 product is exact in fp32)
    out        = acc * (1 / (gs_a * gs_w))   the two encode scales, once, on the accumulator

so the result is the reference (`reference_linear`: decode both operands to fp32, fp32 matmul) up
to fp32 summation order and the one rounding of the folded global scales. fp16, not bf16: the
products also fit bf16, but fp16 has packed f16x2 arithmetic and its e2m1 values are normal numbers
(no subnormal handling in the decode).

Decoding is the cost that bf16 GEMMs do not pay: per K step, (BLOCK_M + BLOCK_N) * BLOCK_K values
on the CUDA cores against 2 * BLOCK_M * BLOCK_N * BLOCK_K tensor-core flops, and Triton runs the
decode and the wgmma of a tile one after the other. Two decoders (`_decode_bytes`):
- PTX (`_DECODE_PTX`, GPU only): 8 values from one 32-bit register of packed bytes in ~19
  instructions. `prmt` looks the fp16 high byte of each magnitude up in an 8-entry byte table
  (e2m1 values have an all-zero low byte in fp16), a second `prmt` makes the sign byte, and one
  `mul.rn.f16x2` per two values applies the block scales.
- arithmetic (`_e2m1_to_fp16`, any target, the Triton interpreter too): the same values by
  integer bit construction, ~10 operations a value.
Measured on an H200 at 8192 x 14336 x 4096: 334 TFLOP/s with the PTX decoder, 195 with the
arithmetic one, against 695 for the bf16 cuBLAS GEMM (docs/perf-notes.md).

The global scales are applied as the fp32 tensor `alpha` = 1 / (gs_a * gs_w), computed on the
device: no host sync; a NaN activation scale (non-finite input) makes the output NaN. Activations
quantized with one global scale per row (what QuantLinear does, so a token's result does not depend
on its batch) give one alpha per output row. A fused projection's weight (q/k/v or gate/up stacked)
keeps one global scale per part, stored per row: then alpha = 1 / gs_a and a second factor
1 / gs_w per output column multiplies the accumulator.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

BLOCK_SIZE = 16  # elements per block scale
BYTES_PER_BLOCK = 8  # packed bytes per block
_BLOCK_SIZE = tl.constexpr(BLOCK_SIZE)  # the same, readable inside kernels
_BYTES_PER_BLOCK = tl.constexpr(BYTES_PER_BLOCK)

# fp16 high bytes of the E2M1 magnitudes 0, 0.5, 1, 1.5 (LUT_LOW) and 2, 3, 4, 6 (LUT_HIGH), byte i = code i.
# The low byte of each is zero: 0x0000, 0x3800, 0x3C00, 0x3E00, 0x4000, 0x4200, 0x4400, 0x4600.
_DECODE_PTX = tl.constexpr("""
{
.reg .b32 lut_low, lut_high, sign_lut, codes, signs, high_bytes_0, high_bytes_1, sign_bytes, p0, p1, p2, p3;
mov.b32 lut_low, 0x3E3C3800;
mov.b32 lut_high, 0x46444240;
mov.b32 sign_lut, 0x00000080;
and.b32 codes, $4, 0x77777777;
shr.b32 signs, $4, 1;
and.b32 signs, signs, 0x44444444;
prmt.b32 high_bytes_0, lut_low, lut_high, codes;
prmt.b32 sign_bytes, 0, sign_lut, signs;
or.b32 high_bytes_0, high_bytes_0, sign_bytes;
shr.b32 codes, codes, 16;
shr.b32 signs, signs, 16;
prmt.b32 high_bytes_1, lut_low, lut_high, codes;
prmt.b32 sign_bytes, 0, sign_lut, signs;
or.b32 high_bytes_1, high_bytes_1, sign_bytes;
prmt.b32 p0, high_bytes_0, 0, 0x2404;
prmt.b32 p1, high_bytes_1, 0, 0x2404;
prmt.b32 p2, high_bytes_0, 0, 0x3414;
prmt.b32 p3, high_bytes_1, 0, 0x3414;
mul.rn.f16x2 p0, p0, $5;
mul.rn.f16x2 p1, p1, $6;
mul.rn.f16x2 p2, p2, $5;
mul.rn.f16x2 p3, p3, $6;
mov.b32 $0, p0;
mov.b32 $1, p1;
mov.b32 $2, p2;
mov.b32 $3, p3;
}
""")
# Register map (pack=4: one invocation takes 4 packed bytes B0..B3 and their 4 fp16 scales):
#   $4 = B0 | B1 << 8 | B2 << 16 | B3 << 24; the nibbles of $4's low half, in order, are the values
#        lo(B0), hi(B0), lo(B1), hi(B1): prmt's 4 selectors are exactly these 4 nibbles (3-bit code,
#        sign bit cleared), so high_bytes_0 holds their fp16 high bytes; sign bit 3 of each nibble,
#        moved to bit 2, selects 0x80 from sign_lut.
#   $5 = (s0, s1), $6 = (s2, s3) as f16x2; outputs lo = ($0 = lo(B0), lo(B1); $1 = lo(B2), lo(B3)),
#   hi = ($2 = hi(B0), hi(B1); $3 = hi(B2), hi(B3)): each pair shares the scale pair of $5 / $6.
# Results go through temporaries: an output register may share its register with an input.


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch parameters of one compiled variant."""

    block_m: int
    block_n: int
    block_k: int  # multiple of 16 (one block scale per 16)
    num_warps: int
    num_stages: int
    group_m: int = 8  # programs along M that share a band of w in L2

    def as_triton(self) -> triton.Config:
        return triton.Config({"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k,
                              "GROUP_M": self.group_m}, num_warps=self.num_warps, num_stages=self.num_stages)


# Autotuned per (M bucket, N, K); the bucket keeps one tuning for every prefill length in it.
# Kept from a sweep on an H200 (docs/perf-notes.md): 128x128x64/8 warps/4 stages was fastest at
# 8192 tokens (334 TFLOP/s); 64x256x128 spilled (116), 128x128x128 ran 281.
SMALL_M_CONFIGS = (
    GemmConfig(16, 64, 128, 4, 4),
    GemmConfig(32, 128, 128, 4, 3),
    GemmConfig(64, 128, 128, 4, 3),
    GemmConfig(64, 64, 256, 4, 3),
)
LARGE_M_CONFIGS = (
    GemmConfig(128, 128, 64, 8, 4),
    GemmConfig(256, 128, 64, 8, 3),
    GemmConfig(128, 256, 128, 8, 2),
    GemmConfig(64, 128, 128, 4, 3),
)
SMALL_M_LIMIT = 64
# For tests and the interpreter: small tiles, any shape.
SMALL_CONFIG = GemmConfig(16, 32, 32, 4, 1)


def m_bucket(m: int) -> int:
    """M rounded up to a power of two, at most 8192: the autotuning key for the token count."""
    return min(triton.next_power_of_2(max(m, 1)), 8192)


@triton.jit
def _e4m3_to_fp16(bits):
    """uint8 E4M3 bits of a non-negative scale -> fp16, exact. Shifted into fp16's field layout the
    bits read as the value times 2**-8 (E4M3 subnormals as fp16 subnormals); the multiply by 2**8 is
    exact. NaN (0x7F) reads as 480: only a NaN global scale writes it, and alpha is then NaN too."""
    fp16_bits = (bits.to(tl.int16) & 0x7F) << 7
    return (fp16_bits.to(tl.float16, bitcast=True) * 256.0).to(tl.float16)


@triton.jit
def _e2m1_to_fp16(nibble):
    """uint8 nibble (sign << 3 | code) -> fp16 E2M1 value. The code lands in fp16's two low exponent
    bits and top mantissa bit, which reads as the value times 2**-14 (code 1 as a subnormal); the
    multiply by 2**14 is exact."""
    n = nibble.to(tl.int32)
    bits = (((n & 7) << 9) | ((n & 8) << 12)).to(tl.int16)  # 0x8000 wraps to the int16 sign bit
    return (bits.to(tl.float16, bitcast=True) * 16384.0).to(tl.float16)


@triton.jit
def _decode_bytes(packed, scale, DECODE_WITH_PTX: tl.constexpr):
    """packed: uint8 [R, C]; scale: fp16 [R, C], each byte's block scale -> (low, high): fp16 [R, C],
    the values of each byte's low and high nibble."""
    if DECODE_WITH_PTX:
        low, high = tl.inline_asm_elementwise(_DECODE_PTX, "=r,=r,=r,=r,r,r,r", [packed, scale],
                                              dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        low = (_e2m1_to_fp16(packed & 0xF) * scale).to(tl.float16)
        high = (_e2m1_to_fp16(packed >> 4) * scale).to(tl.float16)
    return low, high


@triton.jit
def _byte_scales(bits, ROWS: tl.constexpr, HALF_K: tl.constexpr):
    """E4M3 bits [ROWS, HALF_K / 8], one a block -> fp16 [ROWS, HALF_K], the scale of each packed byte.
    Decoded once a block, then repeated by broadcast + reshape in registers (loading the scale byte
    once per packed byte instead ran 2-4x slower: those loads are not pipelined)."""
    scale = _e4m3_to_fp16(bits)
    return tl.reshape(tl.broadcast_to(scale[:, :, None], (ROWS, HALF_K // _BYTES_PER_BLOCK, _BYTES_PER_BLOCK)),
                      (ROWS, HALF_K))


@triton.jit
def _nvfp4_gemm_kernel(
    a_ptr,  # [M, NUM_BLOCKS * 8] uint8, packed activations
    a_scale_ptr,  # [M, NUM_BLOCKS] uint8 (E4M3 bits)
    w_ptr,  # [N, NUM_BLOCKS * 8] uint8, packed weights
    w_scale_ptr,  # [N, NUM_BLOCKS] uint8 (E4M3 bits)
    alpha_ptr,  # [1] or [M] fp32: 1 / (gs_a * gs_w), per row when activations have per-row scales;
    #             1 / gs_a alone when ALPHA_PER_COL
    col_alpha_ptr,  # [N] fp32: 1 / gs_w per output channel (fused projections), or unused
    bias_ptr,  # [N] or unused
    out_ptr,  # [M, N], row stride stride_out
    M,
    N,
    NUM_BLOCKS,  # padded K / 16
    M_BUCKET,  # autotuning key only
    stride_out,
    HAS_BIAS: tl.constexpr,
    DECODE_WITH_PTX: tl.constexpr,
    ALPHA_PER_ROW: tl.constexpr,
    ALPHA_PER_COL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # NUM_BLOCKS is a multiple of BLOCK_K / 16: no K mask
):
    # Grouped order: GROUP_M consecutive programs along M reuse one band of w from L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_M * num_pid_n
    first_m = (pid // programs_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % programs_per_group) % group_rows
    pid_n = (pid % programs_per_group) // group_rows

    # The K order inside a tile does not change the sum as long as both operands use it: instead of
    # interleaving each byte's two nibbles, a tile's low nibbles form one [*, BLOCK_K / 2] operand and
    # its high nibbles another, so the decoded values feed tl.dot without a join or reshape (Triton
    # 3.6 failed to compile join + reshape + trans into a wgmma operand: "Illegal shared layout").
    HALF_K: tl.constexpr = BLOCK_K // 2
    SCALE_BLOCKS: tl.constexpr = BLOCK_K // _BLOCK_SIZE
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Tail rows/cols read the last valid row again (never stored): no M/N masks on the loads.
    a_rows = tl.minimum(rows, M - 1).to(tl.int64)
    w_rows = tl.minimum(cols, N - 1).to(tl.int64)
    byte_cols = tl.arange(0, HALF_K)
    row_bytes = NUM_BLOCKS * _BYTES_PER_BLOCK
    a_ptrs = a_ptr + a_rows[:, None] * row_bytes + byte_cols[None, :]  # [BM, HK]
    w_ptrs = w_ptr + w_rows[:, None] * row_bytes + byte_cols[None, :]  # [BN, HK]
    scale_cols = tl.arange(0, SCALE_BLOCKS)
    a_scale_ptrs = a_scale_ptr + a_rows[:, None] * NUM_BLOCKS + scale_cols[None, :]
    w_scale_ptrs = w_scale_ptr + w_rows[:, None] * NUM_BLOCKS + scale_cols[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for first_block in range(0, NUM_BLOCKS, SCALE_BLOCKS):
        if EVEN_K:
            a_packed = tl.load(a_ptrs)
            w_packed = tl.load(w_ptrs)
            a_scale_bits = tl.load(a_scale_ptrs)
            w_scale_bits = tl.load(w_scale_ptrs)
        else:  # blocks past K read as zero values with zero scales
            byte_mask = (byte_cols + first_block * _BYTES_PER_BLOCK < row_bytes)[None, :]
            scale_mask = (scale_cols + first_block < NUM_BLOCKS)[None, :]
            a_packed = tl.load(a_ptrs, mask=byte_mask, other=0)
            w_packed = tl.load(w_ptrs, mask=byte_mask, other=0)
            a_scale_bits = tl.load(a_scale_ptrs, mask=scale_mask, other=0)
            w_scale_bits = tl.load(w_scale_ptrs, mask=scale_mask, other=0)
        a_scale = _byte_scales(a_scale_bits, BLOCK_M, HALF_K)  # [BM, HK] fp16
        w_scale = _byte_scales(w_scale_bits, BLOCK_N, HALF_K)  # [BN, HK] fp16
        a_low, a_high = _decode_bytes(a_packed, a_scale, DECODE_WITH_PTX)  # [BM, HK] fp16 each
        w_low, w_high = _decode_bytes(w_packed, w_scale, DECODE_WITH_PTX)  # [BN, HK] fp16 each
        acc = tl.dot(a_low, tl.trans(w_low), acc)
        acc = tl.dot(a_high, tl.trans(w_high), acc)
        a_ptrs += HALF_K
        w_ptrs += HALF_K
        a_scale_ptrs += SCALE_BLOCKS
        w_scale_ptrs += SCALE_BLOCKS

    if ALPHA_PER_ROW:
        out = acc * tl.load(alpha_ptr + a_rows)[:, None]  # a_rows: clamped, so tail rows read a valid entry
    else:
        out = acc * tl.load(alpha_ptr)
    if ALPHA_PER_COL:
        out = out * tl.load(col_alpha_ptr + w_rows)[None, :]  # w_rows: clamped like a_rows
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (cols < N)[None, :])


def _even_k(args: dict) -> bool:
    return args["NUM_BLOCKS"] % (args["BLOCK_K"] // BLOCK_SIZE) == 0


_SMALL_M_TRITON_CONFIGS = [c.as_triton() for c in SMALL_M_CONFIGS]
_LARGE_M_TRITON_CONFIGS = [c.as_triton() for c in LARGE_M_CONFIGS]


def _configs_for_m(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """Small-tile configs for M buckets up to SMALL_M_LIMIT (no taller than the bucket), large ones above."""
    bucket = named_args["M_BUCKET"]
    if bucket > SMALL_M_LIMIT:
        return [c for c in configs if any(c is large for large in _LARGE_M_TRITON_CONFIGS)]
    fitting = [c for c in configs if any(c is small for small in _SMALL_M_TRITON_CONFIGS)
               and c.kwargs["BLOCK_M"] <= max(16, bucket)]
    return fitting or _SMALL_M_TRITON_CONFIGS[:1]


_fixed_kernel = triton.heuristics({"EVEN_K": _even_k})(_nvfp4_gemm_kernel)
_autotuned_kernel = triton.autotune(
    configs=_SMALL_M_TRITON_CONFIGS + _LARGE_M_TRITON_CONFIGS,
    key=["M_BUCKET", "N", "NUM_BLOCKS", "HAS_BIAS", "DECODE_WITH_PTX", "ALPHA_PER_ROW", "ALPHA_PER_COL"],
    prune_configs_by={"early_config_prune": _configs_for_m},
)(_fixed_kernel)


def _check_operand(name: str, packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 2 or not packed.is_contiguous():
        raise ValueError(f"{name}_packed must be a contiguous 2-D uint8 tensor, got {packed.dtype} "
                         f"{tuple(packed.shape)} strides {packed.stride()}")
    if packed.shape[1] % BYTES_PER_BLOCK != 0:
        raise ValueError(f"{name}_packed must have a multiple of 8 bytes a row (whole 16-element blocks), got "
                         f"{packed.shape[1]}")
    expected = (packed.shape[0], packed.shape[1] // BYTES_PER_BLOCK)
    if (block_scale.dtype != torch.float8_e4m3fn or tuple(block_scale.shape) != expected
            or not block_scale.is_contiguous()):
        raise ValueError(f"{name}_block_scale must be a contiguous float8_e4m3fn tensor of shape {expected}, got "
                         f"{block_scale.dtype} {tuple(block_scale.shape)}")
    per_row_ok = tuple(global_scale.shape) == (packed.shape[0], 1)
    if global_scale.dtype != torch.float32 or not (global_scale.numel() == 1 or per_row_ok):
        allowed = f"one element or shape ({packed.shape[0]}, 1)"
        raise ValueError(f"{name}_global_scale must be a float32 tensor of {allowed}, got {global_scale.dtype} "
                         f"{tuple(global_scale.shape)}")
    if not (packed.device == block_scale.device == global_scale.device):
        raise ValueError(f"{name}_packed, {name}_block_scale and {name}_global_scale must be on one device")


def nvfp4_gemm(
    a_packed: torch.Tensor,
    a_block_scale: torch.Tensor,
    a_global_scale: torch.Tensor,
    w_packed: torch.Tensor,
    w_block_scale: torch.Tensor,
    w_global_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    config: GemmConfig | None = None,
    decode_with_ptx: bool = True,
) -> torch.Tensor:
    """out [M, N] = decode(a) @ decode(w).T (+ bias), in out_dtype.

    a: packed uint8 [M, Kp/2], block_scale float8_e4m3fn [M, Kp/16], global_scale fp32 one element
    or [M, 1] (as NVFP4Tensor holds them, e.g. from kernels.nvfp4_quantize); w likewise with N rows
    (global_scale one element or [N, 1]) and the same Kp. bias: [N] or None. config: None autotunes per
    (M bucket, N, K); a GemmConfig runs that
    tile. decode_with_ptx: False decodes with plain Triton arithmetic (needed under the interpreter).
    """
    _check_operand("a", a_packed, a_block_scale, a_global_scale)
    _check_operand("w", w_packed, w_block_scale, w_global_scale)
    if a_packed.shape[1] != w_packed.shape[1]:
        raise ValueError(f"a_packed and w_packed must have the same padded K, got {a_packed.shape[1] * 2} and "
                         f"{w_packed.shape[1] * 2}")
    if a_packed.device != w_packed.device:
        raise ValueError(f"a is on {a_packed.device}, w on {w_packed.device}")
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    m, n = a_packed.shape[0], w_packed.shape[0]
    if bias is not None and (tuple(bias.shape) != (n,) or bias.device != a_packed.device or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{n}] tensor on {a_packed.device}, got {tuple(bias.shape)} on "
                         f"{bias.device}")
    if config is not None and (config.block_k % BLOCK_SIZE != 0 or config.block_m < 16 or config.block_n < 16):
        raise ValueError(f"config needs block_k a multiple of 16 and block_m, block_n >= 16, got {config}")
    out = torch.empty(m, n, dtype=out_dtype, device=a_packed.device)
    num_blocks = a_packed.shape[1] // BYTES_PER_BLOCK
    if m == 0 or n == 0:
        return out
    if num_blocks == 0:
        return out.zero_() if bias is None else out.copy_(bias.to(out_dtype).expand(m, n))
    # alpha: [1] or [M] fp32 on the device, no host sync; per-channel weight scales (a fused
    # projection's parts) come as a second factor, col_alpha [N]
    alpha_per_row = a_global_scale.numel() != 1
    alpha_per_col = w_global_scale.numel() != 1
    if alpha_per_col:
        alpha = torch.reciprocal(a_global_scale.reshape(-1)).contiguous()
        col_alpha = torch.reciprocal(w_global_scale.reshape(-1)).contiguous()
    else:
        alpha = torch.reciprocal(a_global_scale.reshape(-1) * w_global_scale.reshape(1)).contiguous()
        col_alpha = alpha
    args = (a_packed, a_block_scale.view(torch.uint8), w_packed, w_block_scale.view(torch.uint8), alpha, col_alpha,
            bias if bias is not None else alpha, out, m, n, num_blocks, m_bucket(m), out.stride(0))

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    if config is None:
        _autotuned_kernel[grid](*args, HAS_BIAS=bias is not None, DECODE_WITH_PTX=decode_with_ptx,
                                ALPHA_PER_ROW=alpha_per_row, ALPHA_PER_COL=alpha_per_col)
    else:
        _fixed_kernel[grid](*args, HAS_BIAS=bias is not None, DECODE_WITH_PTX=decode_with_ptx,
                            ALPHA_PER_ROW=alpha_per_row, ALPHA_PER_COL=alpha_per_col,
                            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                            GROUP_M=config.group_m, num_warps=config.num_warps, num_stages=config.num_stages)
    return out
