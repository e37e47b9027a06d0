"""The activations a linear reads, each made in one launch: RMSNorm (after the residual add) and SwiGLU's product.

In a Llama block every quantized linear but o_proj reads either an RMSNorm output (qkv_proj,
gate_up_proj) or SiLU(gate) * up (down_proj), and each RMSNorm but the first layer's input norm
first adds the previous sublayer's output to the residual stream. Unfused, each of those is several
elementwise kernels and, for a quantized linear, a bf16 tensor written and read straight back by
the activation quantization. `rms_norm_for_linear`, `add_rms_norm_for_linear` and
`silu_mul_for_linear` return what the next linear takes for its precision:

- "bf16": the plain tensor. On CUDA one Triton kernel (fp32/bf16/fp16 rows; the "plain" launchers
  of kernels/rmsnorm_quantize.py and kernels/silu_mul_quantize.py); elsewhere the pure-torch ops below.
- "fp8" / "nvfp4": an FP8Tensor / NVFP4Tensor (per-token scales), which QuantLinear.forward accepts
  as is. On CUDA with bf16/fp16 activations one Triton kernel computes and quantizes each row in
  registers; elsewhere the reference: `quantize_activation(rms_norm(...))`, `quantize_activation(silu_mul(...))`.

`rms_norm`, `add_rms_norm` and `silu_mul` are the pure-torch references of the model's ops.
The fused kernels quantize the row they computed bit-exactly; the row itself can differ from the
reference's in the last bf16 bit where summation order or libdevice math differs (rms_norm's sum of
squares), which the kernels' docstrings spell out.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from mixquant_serve.quant.fp8 import FP8Tensor
from mixquant_serve.quant.linear import (FP8_SCALED_MM_MIN_CAPABILITY, TRITON_NVFP4_MIN_CAPABILITY, LinearInput,
                                         cuda_capability, quantize_activation)
from mixquant_serve.quant.nvfp4 import NVFP4Tensor
from mixquant_serve.quant.precision import Precision, check_precision

# Rows longer than this stay unfused (the fused kernels hold a row in registers).
MAX_FUSED_ROW = 16384


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * dtype(x * rsqrt(mean(x^2) + eps)), normalized in fp32 whatever x's dtype (as transformers does)."""
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The residual add, then RMSNorm: returns (x + delta, rms_norm(x + delta, weight, eps)), both in x's dtype."""
    residual = x + delta
    return residual, rms_norm(residual, weight, eps)


def silu_mul(gate_up: Tensor) -> Tensor:
    """gate_up: [..., 2 * inner] (gate first) -> SiLU(gate) * up: [..., inner]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rms_norm_for_linear(x: Tensor, weight: Tensor, eps: float, precision: Precision) -> LinearInput:
    """x: [tokens, hidden] -> rms_norm(x, weight, eps) as the linear of precision takes it (see module docstring)."""
    check_precision(precision)
    if precision == "bf16":
        if _fuses_plain(x, weight):
            from kernels.rmsnorm_quantize import rmsnorm_plain

            return rmsnorm_plain(x, weight, eps)
        return rms_norm(x, weight, eps)
    if _fuses(x, precision) and weight.dtype == x.dtype and x.shape[-1] <= MAX_FUSED_ROW:
        from kernels.rmsnorm_quantize import rmsnorm_quantize_fp8, rmsnorm_quantize_nvfp4

        if precision == "fp8":
            data, scale = rmsnorm_quantize_fp8(x, weight, eps)
            return FP8Tensor(data=data, scale=scale, shape=x.shape)
        packed, block_scale, global_scale = rmsnorm_quantize_nvfp4(x, weight, eps)
        return NVFP4Tensor(packed=packed, block_scale=block_scale, global_scale=global_scale, shape=x.shape)
    return quantize_activation(rms_norm(x, weight, eps), precision)


def add_rms_norm_for_linear(x: Tensor, delta: Tensor, weight: Tensor, eps: float,
                            precision: Precision) -> tuple[Tensor, LinearInput]:
    """x, delta: [tokens, hidden] -> (x + delta, rms_norm(x + delta, weight, eps) as the linear of precision
    takes it): the residual stream's update and the next sublayer's input from one kernel on CUDA."""
    check_precision(precision)
    fuses_delta = delta.shape == x.shape and delta.dtype == x.dtype and delta.dim() == 2 and \
        (delta.shape[1] <= 1 or delta.stride(1) == 1)
    if precision == "bf16":
        if fuses_delta and _fuses_plain(x, weight):
            from kernels.rmsnorm_quantize import add_rmsnorm_plain

            return add_rmsnorm_plain(x, delta, weight, eps)
        return add_rms_norm(x, delta, weight, eps)
    if fuses_delta and _fuses(x, precision) and weight.dtype == x.dtype and x.shape[-1] <= MAX_FUSED_ROW:
        from kernels.rmsnorm_quantize import add_rmsnorm_quantize_fp8, add_rmsnorm_quantize_nvfp4

        if precision == "fp8":
            residual, data, scale = add_rmsnorm_quantize_fp8(x, delta, weight, eps)
            return residual, FP8Tensor(data=data, scale=scale, shape=x.shape)
        residual, packed, block_scale, global_scale = add_rmsnorm_quantize_nvfp4(x, delta, weight, eps)
        return residual, NVFP4Tensor(packed=packed, block_scale=block_scale, global_scale=global_scale,
                                     shape=x.shape)
    residual, normalized = add_rms_norm(x, delta, weight, eps)
    return residual, quantize_activation(normalized, precision)


def silu_mul_for_linear(gate_up: Tensor, precision: Precision) -> LinearInput:
    """gate_up: [tokens, 2 * inner] -> silu_mul(gate_up) as the linear of precision takes it."""
    check_precision(precision)
    inner = gate_up.shape[-1] // 2
    if precision == "bf16":
        if _plain_rows(gate_up) and inner <= MAX_FUSED_ROW:
            from kernels.silu_mul_quantize import silu_mul_plain

            return silu_mul_plain(gate_up)
        return silu_mul(gate_up)
    if _fuses(gate_up, precision) and inner <= MAX_FUSED_ROW:
        from kernels.silu_mul_quantize import silu_mul_quantize_fp8, silu_mul_quantize_nvfp4

        shape = torch.Size((gate_up.shape[0], inner))
        if precision == "fp8":
            data, scale = silu_mul_quantize_fp8(gate_up)
            return FP8Tensor(data=data, scale=scale, shape=shape)
        packed, block_scale, global_scale = silu_mul_quantize_nvfp4(gate_up)
        return NVFP4Tensor(packed=packed, block_scale=block_scale, global_scale=global_scale, shape=shape)
    return quantize_activation(silu_mul(gate_up), precision)


def _plain_rows(x: Tensor) -> bool:
    """Whether the unquantized Triton kernels take x: non-empty 2-D fp32/bf16/fp16 rows with unit stride on CUDA."""
    return (x.is_cuda and x.dim() == 2 and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and x.shape[0] > 0 and x.shape[1] > 0 and (x.shape[1] == 1 or x.stride(1) == 1))


def _fuses_plain(x: Tensor, weight: Tensor) -> bool:
    """Whether the bf16-path RMSNorm kernel runs: _plain_rows, a weight of x's dtype, a row that fits registers."""
    return _plain_rows(x) and weight.dtype == x.dtype and x.shape[-1] <= MAX_FUSED_ROW


def _fuses(x: Tensor, precision: Precision) -> bool:
    """Whether the fused Triton kernels run: 2-D bf16/fp16 rows with unit stride on a GPU new enough for
    the format (fp8's e4m3 cast needs sm_89)."""
    if not x.is_cuda or x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16) or x.shape[0] == 0:
        return False
    if x.shape[1] == 0 or x.stride(1) != 1:
        return False
    needed = FP8_SCALED_MM_MIN_CAPABILITY if precision == "fp8" else TRITON_NVFP4_MIN_CAPABILITY
    return cuda_capability(x.device) >= needed
