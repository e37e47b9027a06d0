"""QuantLinear: one linear layer that runs in any precision it was prepared for.

Lifecycle: construct (parameters `weight` [out, in] and `bias` [out]), load the weights, then call
`prepare(precisions)` once. It quantizes the weight once per quantized precision (nvfp4: per-tensor
global scale and 16-element block scales; fp8: one scale per output channel) into non-persistent
buffers, and frees the dense weight unless "bf16" is among the precisions: a prefill pool that runs
only nvfp4 keeps no dense copy. `forward(x, precision)` then picks the precision per call, so one
module serves a BF16 decode path and a quantized prefill path when both were prepared.

Fused projections: `parts` splits the output rows into checkpoint tensors stacked in one weight (q/k/v,
gate/up; the loader copies each into `part_rows(i)`), so a layer runs one large GEMM instead of
several small ones. Quantization stays per part: fp8 scales are per channel anyway, and nvfp4 keeps
each part's own global scale on its rows, so the bits equal quantizing the parts one by one.

Quantized forwards are W8A8 / W4A4: activations are quantized per call (fp8: a scale per token;
nvfp4: a global scale per token and 16-element block scales), then multiplied. `x` may also arrive
already quantized (an FP8Tensor / NVFP4Tensor from a fused RMSNorm or SwiGLU kernel, see
quant/activation.py); the output then has the layer's compute dtype. `select_backend` is the one
place that decides how the multiply runs on a device:

- fp8 on CUDA sm_89+: `scaled_mm_fp8_linear` (Triton per-token quantize + torch._scaled_mm with
  row-wise scales); bf16 outputs only, other dtypes and unaligned shapes take the reference.
- nvfp4 on CUDA sm_100+: `native_fp4_linear` (torch._scaled_mm on float4_e2m1fn_x2 with the block
  scales in the blocked layout, quant/blocked_scales.py; global scales applied to the fp32 output).
- nvfp4 on CUDA sm_80 / sm_90: `triton_nvfp4_linear`. Up to DECODED_GEMM_MIN_TOKENS - 1 tokens, the
  Triton GEMM that decodes packed NVFP4 in registers (memory-bound sizes: it reads the weight packed).
  From DECODED_GEMM_MIN_TOKENS tokens on, both operands are decoded exactly to bf16 scratch tensors
  (one memory-bound pass each; storage stays packed) and a dense bf16 tensor-core GEMM applies the
  global scales to its fp32 accumulator: in-register decode on the CUDA cores, not the tensor cores,
  bounds the first kernel at prefill sizes (docs/perf-notes.md).
- everything else (CPU, older GPUs): `reference_linear`.

`reference_linear` dequantizes both operands to fp32 and multiplies in fp32: the numerics every
backend matches up to accumulation order.
"""

import functools
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixquant_serve.quant import fp8, nvfp4
from mixquant_serve.quant.blocked_scales import to_blocked
from mixquant_serve.quant.fp8 import FP8Tensor
from mixquant_serve.quant.nvfp4 import NVFP4Tensor
from mixquant_serve.quant.precision import QUANTIZED_PRECISIONS, Precision, check_precision

# What a linear takes: a [tokens, in] activation, or one already quantized for the precision.
LinearInput = Tensor | FP8Tensor | NVFP4Tensor
LinearBackend = Callable[[LinearInput, "QuantLinear", Precision], Tensor]


class QuantLinear(nn.Module):
    """y = x @ weight.T + bias in a prepared precision. Call `prepare` once after loading weights."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None, parts: Sequence[int] | None = None) -> None:
        """parts: output sizes of the checkpoint tensors stacked in this weight (None: one part)."""
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.parts: tuple[int, ...] = (out_features,) if parts is None else tuple(parts)
        if sum(self.parts) != out_features or any(p <= 0 for p in self.parts):
            raise ValueError(f"parts must be positive sizes adding up to out_features={out_features}, got {parts}")
        self.dtype = dtype  # the compute dtype: outputs of pre-quantized inputs come in it
        self.weight: nn.Parameter | None = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.prepared: frozenset[Precision] = frozenset()

    def extra_repr(self) -> str:
        parts = f", parts={self.parts}" if len(self.parts) > 1 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}{parts}, "
                f"bias={self.bias is not None}, prepared={sorted(self.prepared)}")

    def part_rows(self, index: int) -> slice:
        """The output rows of part `index` (where the loader copies that checkpoint tensor)."""
        if not 0 <= index < len(self.parts):
            raise ValueError(f"index must be in 0..{len(self.parts) - 1}, got {index}")
        start = sum(self.parts[:index])
        return slice(start, start + self.parts[index])

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
            weight_nvfp4 = nvfp4.quantize(weight, self._part_global_scales(weight), name="weight")
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

    def _part_global_scales(self, weight: Tensor) -> Tensor | None:
        """None for one part (quantize computes the tensor's scale); else [out, 1]: each part's own
        global_encode_scale on each of its rows."""
        if len(self.parts) == 1:
            return None
        scales = [nvfp4.global_encode_scale(part.float()).reshape(1).expand(size)
                  for part, size in zip(weight.split(self.parts), self.parts)]
        return torch.cat(scales).reshape(-1, 1)

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

    def forward(self, x: LinearInput, precision: Precision) -> Tensor:
        """x: [..., in_features] in the compute dtype -> [..., out_features] in the same dtype; or x
        already quantized for precision ([tokens, in_features]) -> [tokens, out_features] in self.dtype."""
        self._check_prepared(precision)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must end in in_features={self.in_features}, got shape {tuple(x.shape)}")
        if not isinstance(x, Tensor):
            quantized_as = "fp8" if isinstance(x, FP8Tensor) else "nvfp4" if isinstance(x, NVFP4Tensor) else None
            if quantized_as != precision or len(x.shape) != 2:
                raise ValueError(f"a pre-quantized x must be a 2-D {precision} activation, got {type(x).__name__} "
                                 f"{tuple(x.shape)} for precision {precision!r}")
            return select_backend(precision, _device_of(x))(x, self, precision)
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
TRITON_NVFP4_MIN_CAPABILITY = (8, 0)  # 16-bit tensor-core MMA in Triton
NATIVE_FP4_MIN_CAPABILITY = (10, 0)  # FP4 tensor cores (Blackwell)
# torch._scaled_mm takes K and N in multiples of 16 (FP8 tensor-core tiles); other shapes use the reference.
SCALED_MM_ALIGNMENT = 16
# FP4 _scaled_mm: rows of packed values a multiple of 16 bytes (32 values along K); other shapes
# run the Triton path.
NATIVE_FP4_K_ALIGNMENT = 32
# From this many tokens the nvfp4 linear on sm_80/sm_90 decodes both operands to bf16 and runs a dense GEMM;
# below it, the in-register-decode GEMM (it reads the weight packed, which is what small M is bound by).
DECODED_GEMM_MIN_TOKENS = 512


def select_backend(precision: Precision, device: torch.device) -> LinearBackend:
    """How the quantized linear of precision runs on device (see the module docstring's list)."""
    if precision not in QUANTIZED_PRECISIONS:
        raise ValueError(f"precision must be one of {QUANTIZED_PRECISIONS}, got {precision!r}")
    if device.type != "cuda":
        return reference_linear
    capability = cuda_capability(device)
    if precision == "fp8":
        return scaled_mm_fp8_linear if capability >= FP8_SCALED_MM_MIN_CAPABILITY else reference_linear
    if capability >= NATIVE_FP4_MIN_CAPABILITY:
        return native_fp4_linear
    return triton_nvfp4_linear if capability >= TRITON_NVFP4_MIN_CAPABILITY else reference_linear


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of a CUDA device, cached per device index."""
    return _cuda_capability(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _cuda_capability(device_index: int) -> tuple[int, int]:
    """Cached: select_backend runs on every quantized forward, and the lookup costs host time."""
    return torch.cuda.get_device_capability(device_index)


def _device_of(x: FP8Tensor | NVFP4Tensor) -> torch.device:
    return x.data.device if isinstance(x, FP8Tensor) else x.packed.device


def _out_dtype(x: LinearInput, layer: "QuantLinear") -> torch.dtype:
    """A tensor input's dtype; the layer's compute dtype for an input that arrived quantized."""
    return x.dtype if isinstance(x, Tensor) else layer.dtype


def scaled_mm_fp8_linear(x: LinearInput, layer: "QuantLinear", precision: Precision) -> Tensor:
    """x: [tokens, in] bf16 on CUDA (or its FP8Tensor) -> [tokens, out] bf16: W8A8 e4m3 with per-token
    and per-channel scales.

    The Triton kernel quantizes x per token (bit-exact with fp8.quantize, one pass, no host sync);
    torch._scaled_mm multiplies e4m3 x e4m3 with fp32 accumulation and applies both row-wise scales
    before the bf16 rounding. Row-wise scaling gives bf16 output only, so other output dtypes (fp32 on
    a GPU, in tests) and shapes _scaled_mm cannot tile run `reference_linear`.
    """
    if precision != "fp8":
        raise ValueError(f"scaled_mm_fp8_linear runs precision 'fp8', got {precision!r}")
    if (_out_dtype(x, layer) != torch.bfloat16 or layer.in_features % SCALED_MM_ALIGNMENT != 0
            or layer.out_features % SCALED_MM_ALIGNMENT != 0):
        return reference_linear(x, layer, precision)
    if isinstance(x, FP8Tensor):
        x_fp8, x_scale = x.data, x.scale
    else:
        # Imported here: Triton is present with CUDA builds of torch, not necessarily on CPU hosts.
        from kernels.fp8_quantize import fp8_quantize

        # x_fp8: [tokens, in] e4m3; x_scale: [tokens, 1] fp32
        x_fp8, x_scale = fp8_quantize(x)
    # weight_fp8_data: [out, in] row-major, so its .t() is the column-major [in, out] operand
    # _scaled_mm wants; weight_fp8_scale: [out, 1] -> [1, out]
    y = torch._scaled_mm(x_fp8, layer.weight_fp8_data.t(), scale_a=x_scale, scale_b=layer.weight_fp8_scale.t(),
                         out_dtype=torch.bfloat16)
    return y if layer.bias is None else y + layer.bias


def triton_nvfp4_linear(x: LinearInput, layer: "QuantLinear", precision: Precision) -> Tensor:
    """x: [tokens, in] on CUDA (or its NVFP4Tensor) -> [tokens, out] in x's dtype: W4A4 NVFP4 without
    FP4 tensor cores.

    Activations are quantized by the Triton quantize kernel (bit-exact with nvfp4.quantize) unless they
    arrive quantized. Below DECODED_GEMM_MIN_TOKENS tokens the Triton GEMM reads both operands packed
    and decodes them exactly to fp16 in registers; from there on, kernels/nvfp4_decode.py decodes both
    to bf16 block values (q * s, exact) and kernels/scaled_gemm.py multiplies them on the tensor cores,
    applying 1 / gs_a per token and 1 / gs_w per channel to the fp32 accumulator. Either way: the
    reference numerics up to summation order. The decoded weight is a scratch tensor of one call
    (out x in bf16, freed to the caching allocator when the call returns).
    """
    if precision != "nvfp4":
        raise ValueError(f"triton_nvfp4_linear runs precision 'nvfp4', got {precision!r}")
    activation = x if isinstance(x, NVFP4Tensor) else quantize_activation(x, "nvfp4")
    weight = layer.quantized_weight("nvfp4")
    out_dtype = _out_dtype(x, layer)
    if activation.shape[0] >= DECODED_GEMM_MIN_TOKENS:
        from kernels.nvfp4_decode import nvfp4_decode
        from kernels.scaled_gemm import scaled_gemm

        # a_values: [tokens, Kp] and w_values: [out, Kp] bf16, the exact q * s of each operand
        a_values = nvfp4_decode(activation.packed, activation.block_scale)
        w_values = nvfp4_decode(weight.packed, weight.block_scale)
        return scaled_gemm(a_values, w_values, torch.reciprocal(activation.global_scale),
                           torch.reciprocal(weight.global_scale), out_dtype=out_dtype, bias=layer.bias)
    from kernels.nvfp4_gemm import nvfp4_gemm

    return nvfp4_gemm(activation.packed, activation.block_scale, activation.global_scale, weight.packed,
                      weight.block_scale, weight.global_scale, out_dtype=out_dtype, bias=layer.bias)


def native_fp4_linear(x: LinearInput, layer: "QuantLinear", precision: Precision) -> Tensor:
    """x: [tokens, in] on CUDA sm_100+ (or its NVFP4Tensor) -> [tokens, out] in x's dtype: W4A4 on FP4
    tensor cores.

    torch._scaled_mm multiplies the packed operands as float4_e2m1fn_x2 (our nibble order is theirs)
    with the E4M3 block scales in the blocked layout (quant/blocked_scales.py), accumulating in fp32
    into an fp32 output; the global scales (per token for activations, per part for weights) multiply
    that output before the one rounding to the output dtype. Shapes the FP4 GEMM cannot tile run the
    Triton path. Not run on the development cards (sm_90): its layout is unit-tested on CPU.
    """
    if precision != "nvfp4":
        raise ValueError(f"native_fp4_linear runs precision 'nvfp4', got {precision!r}")
    if layer.in_features % NATIVE_FP4_K_ALIGNMENT != 0 or layer.out_features % SCALED_MM_ALIGNMENT != 0:
        return triton_nvfp4_linear(x, layer, precision)
    activation = x if isinstance(x, NVFP4Tensor) else quantize_activation(x, "nvfp4")
    weight = layer.quantized_weight("nvfp4")
    # a: [tokens, in/2] and w: [out, in/2], K contiguous; w.t() is the column-major [in/2, out] operand
    acc = torch._scaled_mm(activation.packed.view(torch.float4_e2m1fn_x2),
                           weight.packed.view(torch.float4_e2m1fn_x2).t(),
                           scale_a=to_blocked(activation.block_scale), scale_b=to_blocked(weight.block_scale),
                           out_dtype=torch.float32)
    # acc: [tokens, out] = sum of q*s products; divide by gs_a per row and gs_w per part
    y = acc * torch.reciprocal(activation.global_scale) * torch.reciprocal(weight.global_scale).reshape(1, -1)
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.to(_out_dtype(x, layer))


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


def reference_linear(x: LinearInput, layer: QuantLinear, precision: Precision) -> Tensor:
    """x: [tokens, in] (or already quantized) -> [tokens, out]: quantize x, decode both operands to fp32,
    fp32 matmul + bias, cast to x's dtype (the layer's dtype for a quantized x). fp32 math is what
    tensor-core backends accumulate in."""
    activation = x if isinstance(x, (FP8Tensor, NVFP4Tensor)) else quantize_activation(x, precision)
    if not isinstance(activation, NVFP4Tensor if precision == "nvfp4" else FP8Tensor):
        raise ValueError(f"x was quantized as {type(x).__name__}, not as {precision!r}")
    x_hat = _dequantize(activation)
    bias = layer.bias.float() if layer.bias is not None else None
    return F.linear(x_hat, layer.dequantized_weight(precision), bias).to(_out_dtype(x, layer))


def _dequantize(t: NVFP4Tensor | FP8Tensor) -> Tensor:
    return nvfp4.dequantize(t) if isinstance(t, NVFP4Tensor) else fp8.dequantize(t)
