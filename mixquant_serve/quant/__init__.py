"""Quantized formats (NVFP4, FP8: pure-torch references), precision choice, and QuantLinear.

Modules: nvfp4 and fp8 (quantize / dequantize, the numerics every backend must match),
precision (Precision, resolve_precision, default_compute_dtype), linear (QuantLinear and the
choice of matmul backend), activation (RMSNorm / SwiGLU handing a linear its input already
quantized), matmul (reference of the scaled dense GEMM), blocked_scales (the FP4 tensor cores'
block-scale layout).
"""

from mixquant_serve.quant.fp8 import FP8Tensor
from mixquant_serve.quant.linear import QuantLinear
from mixquant_serve.quant.nvfp4 import NVFP4Tensor
from mixquant_serve.quant.precision import Precision, PrefillPrecisionChoice, default_compute_dtype, resolve_precision

__all__ = [
    "FP8Tensor",
    "NVFP4Tensor",
    "Precision",
    "PrefillPrecisionChoice",
    "QuantLinear",
    "default_compute_dtype",
    "resolve_precision",
]
