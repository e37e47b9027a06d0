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
`select_backend` is the one place that decides how that multiply runs on a device; today every
device uses `reference_linear` (dequantize both operands to fp32, matmul in fp32). GPU backends
(Triton NVFP4 GEMM on sm_90, torch._scaled_mm for fp8 and native FP4 on sm_100) plug in there.
"""

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


def select_backend(precision: Precision, device: torch.device) -> LinearBackend:
    """How the quantized linear of precision runs on device. Today: the reference everywhere."""
    if precision not in QUANTIZED_PRECISIONS:
        raise ValueError(f"precision must be one of {QUANTIZED_PRECISIONS}, got {precision!r}")
    return reference_linear


def quantize_activation(x: Tensor, precision: Precision) -> NVFP4Tensor | FP8Tensor:
    """Dynamic activation quantization, x: [tokens, in_features].

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

        global_scale = nvfp4.global_encode_scale(x)
        packed, block_scale = nvfp4_quantize(x.contiguous(), global_scale)
        return NVFP4Tensor(packed=packed, block_scale=block_scale, global_scale=global_scale, shape=x.shape)
    return nvfp4.quantize(x, name="activation")


def reference_linear(x: Tensor, layer: QuantLinear, precision: Precision) -> Tensor:
    """x: [tokens, in] -> [tokens, out]: quantize x, decode both operands to fp32, fp32 matmul + bias,
    cast to x's dtype. fp32 math is what tensor-core backends accumulate in."""
    x_hat = _dequantize(quantize_activation(x, precision))
    bias = layer.bias.float() if layer.bias is not None else None
    return F.linear(x_hat, layer.dequantized_weight(precision), bias).to(x.dtype)


def _dequantize(t: NVFP4Tensor | FP8Tensor) -> Tensor:
    return nvfp4.dequantize(t) if isinstance(t, NVFP4Tensor) else fp8.dequantize(t)
