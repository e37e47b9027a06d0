"""SwiGLU's SiLU(gate) * up in one launch, optionally fused with the per-token activation quantization of
the down projection (the "plain" launcher stores the product in the input's dtype: the bf16 path).

Input is the fused gate_up projection's output [M, 2 * I] (gate in the first I columns, up in the
last I). One program per row; the row's I products are formed and quantized in registers, so the
[M, I] bf16 product (and F.silu's intermediate) are never written. The math is the reference's
(mixquant_serve/quant/activation.py silu_mul, F.silu(gate) * up in x's dtype, then fp8.quantize or
nvfp4.quantize with per-row encode scales):

    s = dtype(div_rn(g, 1 + exp(-g)))      g = float(gate); exp is libdevice's expf, what torch's CUDA silu calls
    z = dtype(float(s) * float(up))        the two roundings of the unfused ops
    quantize z per row                      kernels/row_quantize.py, bit-exact given z (or store z)

Rows of up to MAX_INNER products; wider ones take the unfused path. The plain launcher also takes
fp32 rows (the quantized ones bf16/fp16 only).
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kernels.row_quantize import _fp8_quantize_row, _nvfp4_quantize_row

MAX_INNER = 16384
NVFP4_BLOCK = 16
PLAIN, FP8, NVFP4 = 0, 1, 2  # OUT_FORMAT of the kernel


@triton.jit
def _silu_mul_quantize_kernel(
    gate_up_ptr,  # [M, 2 * INNER] bf16/fp16, unit stride along the row
    out_ptr,  # plain: [M, INNER] gate_up's dtype; fp8: data [M, INNER] e4m3; nvfp4: packed [M, NUM_BLOCKS * 8] uint8
    scale_ptr,  # fp8: [M] fp32 decode scales; nvfp4: block scales [M, NUM_BLOCKS] uint8; plain: unused
    global_scale_ptr,  # nvfp4: [M] fp32 encode scales; otherwise unused
    INNER,
    NUM_BLOCKS,  # nvfp4: ceil(INNER / 16)
    stride_row,
    OUT_FORMAT: tl.constexpr,  # PLAIN, FP8 or NVFP4
    ACCURATE_EXP: tl.constexpr,  # libdevice expf (torch's); False: tl.exp (the interpreter has no libdevice)
    BLOCK: tl.constexpr,  # power of two >= INNER (and >= 16)
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    gate = tl.load(gate_up_ptr + row * stride_row + cols, mask=cols < INNER, other=0.0)
    up = tl.load(gate_up_ptr + row * stride_row + INNER + cols, mask=cols < INNER, other=0.0)
    g = gate.to(tl.float32)
    if ACCURATE_EXP:
        e = libdevice.exp(-g)
    else:
        e = tl.exp(-g)
    silu = tl.div_rn(g, 1.0 + e).to(gate.dtype)
    z = (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)
    if OUT_FORMAT == 0:
        tl.store(out_ptr + row * INNER + cols, z, mask=cols < INNER)
    elif OUT_FORMAT == 2:
        _nvfp4_quantize_row(z.to(tl.float32), NUM_BLOCKS, out_ptr + row * (NUM_BLOCKS * 8), scale_ptr + row * NUM_BLOCKS,
                            global_scale_ptr + row, BLOCK)
    else:
        _fp8_quantize_row(z.to(tl.float32), cols, INNER, out_ptr + row * INNER, scale_ptr + row)


def _dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    """(float32, bfloat16, float16) -> "float32, bfloat16 or float16"."""
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _check(gate_up: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)) -> int:
    if gate_up.dim() != 2 or (gate_up.shape[1] > 1 and gate_up.stride(1) != 1):
        raise ValueError(f"gate_up must be 2-D with unit stride along its rows, got shape {tuple(gate_up.shape)} "
                         f"strides {gate_up.stride()}")
    if gate_up.dtype not in dtypes:
        raise ValueError(f"gate_up must be {_dtype_names(dtypes)}, got {gate_up.dtype}")
    if gate_up.shape[1] % 2 != 0 or not 0 < gate_up.shape[1] // 2 <= MAX_INNER:
        raise ValueError(f"gate_up rows must hold 2 x (1..{MAX_INNER}) elements, got {gate_up.shape[1]}")
    return gate_up.shape[1] // 2


def _launch_shape(inner: int) -> tuple[int, int]:
    """BLOCK and num_warps: a row's values over up to 1024 threads. The kernel is issue-bound (exp and two
    correctly rounded divisions a value); at 8192 x 14336 on an H100, 32 warps ran 0.44 ms, 16 warps
    0.51, 8 warps 0.64 (docs/perf-notes.md, run 7)."""
    block = max(16, triton.next_power_of_2(inner))
    return block, max(1, min(32, block // 512))


def silu_mul_plain(gate_up: torch.Tensor, accurate_exp: bool = True) -> torch.Tensor:
    """gate_up: [M, 2I] fp32/bf16/fp16 -> silu_mul(gate_up): [M, I] in gate_up's dtype. accurate_exp: as for
    silu_mul_quantize_fp8."""
    inner = _check(gate_up, (torch.float32, torch.bfloat16, torch.float16))
    m = gate_up.shape[0]
    out = torch.empty(m, inner, dtype=gate_up.dtype, device=gate_up.device)
    if m > 0:
        block, num_warps = _launch_shape(inner)
        _silu_mul_quantize_kernel[(m,)](gate_up, out, out, out, inner, 0, gate_up.stride(0), OUT_FORMAT=PLAIN,
                                        ACCURATE_EXP=accurate_exp, BLOCK=block, num_warps=num_warps)
    return out


def silu_mul_quantize_fp8(gate_up: torch.Tensor, accurate_exp: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up: [M, 2I] bf16/fp16 -> data float8_e4m3fn [M, I] and scale float32 [M, 1]:
    fp8.quantize(silu_mul(gate_up)). accurate_exp: False uses Triton's fast exp (needed under the
    interpreter, which has no libdevice; the result may then differ from torch's in the last bit)."""
    inner = _check(gate_up)
    m = gate_up.shape[0]
    data = torch.empty(m, inner, dtype=torch.float8_e4m3fn, device=gate_up.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=gate_up.device)
    if m > 0:
        block, num_warps = _launch_shape(inner)
        _silu_mul_quantize_kernel[(m,)](gate_up, data, scale, scale, inner, 0, gate_up.stride(0),
                                        OUT_FORMAT=FP8, ACCURATE_EXP=accurate_exp, BLOCK=block, num_warps=num_warps)
    return data, scale


def silu_mul_quantize_nvfp4(gate_up: torch.Tensor,
                            accurate_exp: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate_up: [M, 2I] bf16/fp16 -> packed uint8 [M, Ip/2], block_scale float8_e4m3fn [M, Ip/16] and
    global_scale float32 [M, 1]: nvfp4.quantize(z, row_encode_scales(z)) of z = silu_mul(gate_up).
    accurate_exp: as for silu_mul_quantize_fp8."""
    inner = _check(gate_up)
    m = gate_up.shape[0]
    num_blocks = triton.cdiv(inner, NVFP4_BLOCK)
    packed = torch.empty(m, num_blocks * NVFP4_BLOCK // 2, dtype=torch.uint8, device=gate_up.device)
    block_scale = torch.empty(m, num_blocks, dtype=torch.float8_e4m3fn, device=gate_up.device)
    global_scale = torch.empty(m, 1, dtype=torch.float32, device=gate_up.device)
    if m > 0:
        block, num_warps = _launch_shape(inner)
        _silu_mul_quantize_kernel[(m,)](gate_up, packed, block_scale.view(torch.uint8), global_scale, inner,
                                        num_blocks, gate_up.stride(0), OUT_FORMAT=NVFP4, ACCURATE_EXP=accurate_exp,
                                        BLOCK=block, num_warps=num_warps)
    return packed, block_scale, global_scale
