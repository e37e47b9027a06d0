"""QuantLinear: one linear layer that runs in any precision it was prepared for.

Lifecycle: construct (parameters `weight` [out, in] and `bias` [out], the Hugging Face names, so
checkpoint loading is a name mapping), load the weights, then call `prepare(precisions)` once. It
quantizes the weight once per quantized precision (nvfp4: per-tensor global scale and 16-element
block scales; fp8: one scale per output channel) into non-persistent buffers, and frees the dense
weight unless "bf16" is among the precisions: a prefill pool that runs only nvfp4 keeps no dense
copy. `forward(x, precision)` then picks the precision per call, so one module serves a BF16 decode
path and a quantized prefill path when both were prepared.

Quantized forwards are W8A8 / W4A4: activations are quantized per call (fp8: a scale per token;
nvfp4: a dynamic per-tensor global scale and 16-element block scales), then multiplied.
`select_backend` is the one place that decides how that multiply runs on a device:

- fp8 on CUDA sm_89+: `scaled_mm_fp8_linear` (Triton per-token quantize + torch._scaled_mm with
  row-wise scales); bf16 activations only, other dtypes and unaligned shapes take the reference.
- nvfp4 on CUDA sm_80+: `triton_nvfp4_linear` (Triton quantize + Triton GEMM that decodes packed
  NVFP4 in registers to fp16 tensor-core MMA).
- everything else (CPU, older GPUs): `reference_linear`.

`reference_linear` dequantizes both operands to fp32 and multiplies in fp32: the numerics every
backend matches up to accumulation order. Native FP4 on sm_100+ (torch._scaled_mm with
float4_e2m1fn_x2 and blocked scales) is not implemented: those GPUs run the Triton NVFP4 GEMM.
"""

import functools
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixquant_serve.quant import fp8, nvfp4
from mixquant_serve.quant.fp8 import FP8Tensor
from mixquant_serve.quant.nvfp4 import NVFP4Tensor
from mixquant_serve.quant.precision import QUANTIZED_PRECISIONS, Precision, check_precision

LinearBackend = Callable[[Tensor, "QuantLinear", Precision], Tensor]


class QuantLinear(nn.Module):
    """y = x @ weight.T + bias in a prepared precision. Call `prepare` once after loading weights."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight: nn.Parameter | None = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.prepared: frozenset[Precision] = frozenset()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, prepared={sorted(self.prepared)}")

    @torch.no_grad()
    def prepare(self, precisions: Iterable[Precision]) -> None:
        """Quantize the loaded weight once for each quantized precision; free it unless "bf16" is kept.

        On CPU the dequantized fp32 weight of each quantized precision is cached too (the reference
        backend would otherwise dequantize it every forward; the numbers are the same).
        """
        requested = frozenset(check_precision(p) for p in precisions)
        if not requested:
            raise ValueError("precisions must name at least one precision")
        if self.prepared:
            raise RuntimeError(f"prepare() was already called (prepared: {sorted(self.prepared)})")
        weight = self.weight.detach()
        if "nvfp4" in requested:
            weight_nvfp4 = nvfp4.quantize(weight, name="weight")
            self.register_buffer("weight_nvfp4_packed", weight_nvfp4.packed, persistent=False)
            self.register_buffer("weight_nvfp4_block_scale", weight_nvfp4.block_scale, persistent=False)
            self.register_buffer("weight_nvfp4_global_scale", weight_nvfp4.global_scale, persistent=False)
        if "fp8" in requested:
            weight_fp8 = fp8.quantize(weight, name="weight")
            self.register_buffer("weight_fp8_data", weight_fp8.data, persistent=False)
            self.register_buffer("weight_fp8_scale", weight_fp8.scale, persistent=False)
        self.prepared = requested
        if weight.device.type == "cpu":
            for precision in sorted(requested & set(QUANTIZED_PRECISIONS)):
                self.register_buffer(f"weight_{precision}_dequantized", _dequantize(self.quantized_weight(precision)),
                                     persistent=False)
        if "bf16" not in requested:
            self.weight = None

    def quantized_weight(self, precision: Precision) -> NVFP4Tensor | FP8Tensor:
        """The stored quantized weight ([out, in]) of a prepared quantized precision."""
        self._check_prepared(precision)
        shape = torch.Size((self.out_features, self.in_features))
        if precision == "nvfp4":
            return NVFP4Tensor(packed=self.weight_nvfp4_packed, block_scale=self.weight_nvfp4_block_scale,
                               global_scale=self.weight_nvfp4_global_scale, shape=shape)
        if precision == "fp8":
            return FP8Tensor(data=self.weight_fp8_data, scale=self.weight_fp8_scale, shape=shape)
        raise ValueError(f"precision {precision!r} has no quantized weight")

    def dequantized_weight(self, precision: Precision) -> Tensor:
        """fp32 [out, in]: the quantized weight decoded (cached on CPU, decoded per call elsewhere)."""
        cached = getattr(self, f"weight_{precision}_dequantized", None)
        return cached if cached is not None else _dequantize(self.quantized_weight(precision))

    def weight_bytes(self, precision: Precision) -> int:
        """Bytes stored for the weight in precision (scales included; bias and CPU caches excluded)."""
        self._check_prepared(precision)
        if precision == "bf16":
            return self.weight.numel() * self.weight.element_size()
        return self.quantized_weight(precision).nbytes()

    def forward(self, x: Tensor, precision: Precision) -> Tensor:
        """x: [..., in_features] in the compute dtype -> [..., out_features] in the same dtype."""
        self._check_prepared(precision)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must end in in_features={self.in_features}, got shape {tuple(x.shape)}")
        if precision == "bf16":
            return F.linear(x, self.weight, self.bias)
        # x2d: [tokens, in_features]
        x2d = x.reshape(-1, self.in_features)
        y = select_backend(precision, x.device)(x2d, self, precision)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _check_prepared(self, precision: Precision) -> None:
        check_precision(precision)
        if precision not in self.prepared:
            raise ValueError(f"precision {precision!r} was not prepared for this layer "
                             f"(prepared: {sorted(self.prepared)}); pass it to prepare() after loading weights")


# Compute capabilities from which a CUDA backend runs (below them: reference_linear).
FP8_SCALED_MM_MIN_CAPABILITY = (8, 9)  # FP8 tensor cores (Ada, Hopper and later)
TRITON_NVFP4_MIN_CAPABILITY = (8, 0)  # fp16 tensor-core MMA in Triton
NATIVE_FP4_MIN_CAPABILITY = (10, 0)  # FP4 tensor cores (Blackwell)
# torch._scaled_mm takes K and N in multiples of 16 (FP8 tensor-core tiles); other shapes use the reference.
SCALED_MM_ALIGNMENT = 16


def select_backend(precision: Precision, device: torch.device) -> LinearBackend:
    """How the quantized linear of precision runs on device (see the module docstring's table)."""
    if precision not in QUANTIZED_PRECISIONS:
        raise ValueError(f"precision must be one of {QUANTIZED_PRECISIONS}, got {precision!r}")
    if device.type != "cuda":
        return reference_linear
    capability = _cuda_capability(torch.cuda.current_device() if device.index is None else device.index)
    if precision == "fp8":
        return scaled_mm_fp8_linear if capability >= FP8_SCALED_MM_MIN_CAPABILITY else reference_linear
    if capability >= NATIVE_FP4_MIN_CAPABILITY:
        # Native FP4 through torch._scaled_mm is not implemented yet; the Triton GEMM is correct there too.
        return triton_nvfp4_linear
    return triton_nvfp4_linear if capability >= TRITON_NVFP4_MIN_CAPABILITY else reference_linear


@functools.cache
def _cuda_capability(device_index: int) -> tuple[int, int]:
    """Cached: select_backend runs on every quantized forward, and the lookup costs host time."""
    return torch.cuda.get_device_capability(device_index)


def scaled_mm_fp8_linear(x: Tensor, layer: "QuantLinear", precision: Precision) -> Tensor:
    """x: [tokens, in] bf16 on CUDA -> [tokens, out] bf16: W8A8 e4m3 with per-token and per-channel scales.

    The Triton kernel quantizes x per token (bit-exact with fp8.quantize, one pass, no host sync);
    torch._scaled_mm multiplies e4m3 x e4m3 with fp32 accumulation and applies both row-wise scales
    before the bf16 rounding. Row-wise scaling gives bf16 output only, so other activation dtypes
    (fp32 on a GPU, in tests) and shapes _scaled_mm cannot tile run `reference_linear`.
    """
    if precision != "fp8":
        raise ValueError(f"scaled_mm_fp8_linear runs precision 'fp8', got {precision!r}")
    if (x.dtype != torch.bfloat16 or layer.in_features % SCALED_MM_ALIGNMENT != 0
            or layer.out_features % SCALED_MM_ALIGNMENT != 0):
        return reference_linear(x, layer, precision)
    # Imported here: Triton is present with CUDA builds of torch, not necessarily on CPU hosts.
    from kernels.fp8_quantize import fp8_quantize

    # x_fp8: [tokens, in] e4m3; x_scale: [tokens, 1] fp32
    x_fp8, x_scale = fp8_quantize(x)
    # weight_fp8_data: [out, in] row-major, so its .t() is the column-major [in, out] operand
    # _scaled_mm wants; weight_fp8_scale: [out, 1] -> [1, out]
    y = torch._scaled_mm(x_fp8, layer.weight_fp8_data.t(), scale_a=x_scale, scale_b=layer.weight_fp8_scale.t(),
                         out_dtype=torch.bfloat16)
    return y if layer.bias is None else y + layer.bias


def triton_nvfp4_linear(x: Tensor, layer: "QuantLinear", precision: Precision) -> Tensor:
    """x: [tokens, in] on CUDA -> [tokens, out] in x's dtype: W4A4 NVFP4 through the Triton kernels.

    Activations are quantized by the Triton quantize kernel (bit-exact with nvfp4.quantize); the
    Triton GEMM reads both operands packed, decodes them exactly to fp16 in registers, accumulates
    in fp32 on the tensor cores and applies the two global scales and the bias at the end: the
    reference numerics up to summation order.
    """
    if precision != "nvfp4":
        raise ValueError(f"triton_nvfp4_linear runs precision 'nvfp4', got {precision!r}")
    from kernels.nvfp4_gemm import nvfp4_gemm

    activation = quantize_activation(x, "nvfp4")
    weight = layer.quantized_weight("nvfp4")
    return nvfp4_gemm(activation.packed, activation.block_scale, activation.global_scale, weight.packed,
                      weight.block_scale, weight.global_scale, out_dtype=x.dtype, bias=layer.bias)


def quantize_activation(x: Tensor, precision: Precision) -> NVFP4Tensor | FP8Tensor:
    """Dynamic activation quantization, x: [tokens, in_features].

    nvfp4 uses one global scale per token (nvfp4.row_encode_scales), fp8 one scale per token: a
    token's quantized activations never depend on the other tokens of its forward, so prefix-cached
    KV, chunked prefill and batched requests all give the same bits as a request alone.

    nvfp4 on CUDA runs the Triton kernel, bit-identical to the reference; it skips the NaN/Inf scan
    (a host sync per layer), and non-finite activations decode to NaN instead of raising.
    """
    if precision == "fp8":
        return fp8.quantize(x, name="activation")
    if precision != "nvfp4":
        raise ValueError(f"precision must be one of {QUANTIZED_PRECISIONS}, got {precision!r}")
    if x.is_cuda:
        # Imported here: Triton is present with CUDA builds of torch, not necessarily on CPU hosts.
        from kernels.nvfp4_quantize import nvfp4_quantize

        global_scale = nvfp4.row_encode_scales(x)
        packed, block_scale = nvfp4_quantize(x.contiguous(), global_scale)
        return NVFP4Tensor(packed=packed, block_scale=block_scale, global_scale=global_scale, shape=x.shape)
    return nvfp4.quantize(x, nvfp4.row_encode_scales(x), name="activation")


def reference_linear(x: Tensor, layer: QuantLinear, precision: Precision) -> Tensor:
    """x: [tokens, in] -> [tokens, out]: quantize x, decode both operands to fp32, fp32 matmul + bias,
    cast to x's dtype. fp32 math is what tensor-core backends accumulate in."""
    x_hat = _dequantize(quantize_activation(x, precision))
    bias = layer.bias.float() if layer.bias is not None else None
    return F.linear(x_hat, layer.dequantized_weight(precision), bias).to(x.dtype)


def _dequantize(t: NVFP4Tensor | FP8Tensor) -> Tensor:
    return nvfp4.dequantize(t) if isinstance(t, NVFP4Tensor) else fp8.dequantize(t)
