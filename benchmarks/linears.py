"""Per-linear micro-benchmark: bf16 F.linear vs the fp8 and nvfp4 QuantLinear paths (activation
quantization included), each part timed on its own, plus the fused activation kernels.

Shapes are Llama-3.1-8B's linears [N = out, K = in] as the model runs them: fused qkv (q, k, v
stacked), o, fused gate_up, down. The nvfp4 rows time both of its GEMMs: the in-register-decode
Triton GEMM (what runs below DECODED_GEMM_MIN_TOKENS tokens) and the decode-to-bf16 + dense scaled GEMM
path (what runs from there on), so each is measured at every size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.measure import median_ms
from kernels.fp8_quantize import fp8_quantize
from kernels.nvfp4_decode import nvfp4_decode
from kernels.nvfp4_gemm import nvfp4_gemm
from kernels.scaled_gemm import scaled_gemm
from mixquant_serve.quant.activation import rms_norm, rms_norm_for_linear, silu_mul, silu_mul_for_linear
from mixquant_serve.quant.linear import QuantLinear, quantize_activation, reference_linear

LLAMA_3_1_8B_LINEARS: tuple[tuple[str, int, int, tuple[int, ...]], ...] = (
    ("qkv (fused)", 6144, 4096, (4096, 1024, 1024)),
    ("o", 4096, 4096, (4096,)),
    ("gate_up (fused)", 28672, 4096, (14336, 14336)),
    ("down", 4096, 14336, (4096,)),
)
TOKEN_COUNTS = (2048, 8192)
HIDDEN, INTERMEDIATE = 4096, 14336


def make_layer(n: int, k: int, parts: tuple[int, ...], device: torch.device) -> QuantLinear:
    """A bf16 QuantLinear [n, k] with normal(0, 0.02) weights, prepared for bf16, fp8 and nvfp4."""
    layer = QuantLinear(k, n, dtype=torch.bfloat16, device=device, parts=parts)
    layer.weight.normal_(0.0, 0.02)
    layer.prepare(["bf16", "fp8", "nvfp4"])
    return layer


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y.float() - reference.float()).norm() / reference.float().norm()).item()


def bench_shape(name: str, n: int, k: int, parts: tuple[int, ...], m: int, device: torch.device) -> dict[str, object]:
    """Times of one linear shape at m tokens, in ms, with TFLOP/s and the errors against the reference."""
    layer = make_layer(n, k, parts, device)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    flops = 2 * m * n * k
    x_fp8, x_scale = fp8_quantize(x)
    x_nvfp4 = quantize_activation(x, "nvfp4")
    w_nvfp4 = layer.quantized_weight("nvfp4")
    a_values = nvfp4_decode(x_nvfp4.packed, x_nvfp4.block_scale)
    w_values = nvfp4_decode(w_nvfp4.packed, w_nvfp4.block_scale)
    a_inverse, w_inverse = torch.reciprocal(x_nvfp4.global_scale), torch.reciprocal(w_nvfp4.global_scale)

    times = {
        "bf16": median_ms(lambda: F.linear(x, layer.weight)),
        "fp8": median_ms(lambda: layer(x, "fp8")),
        "fp8_quantize": median_ms(lambda: fp8_quantize(x)),
        "fp8_gemm": median_ms(lambda: torch._scaled_mm(x_fp8, layer.weight_fp8_data.t(), scale_a=x_scale,
                                                       scale_b=layer.weight_fp8_scale.t(), out_dtype=torch.bfloat16)),
        "nvfp4": median_ms(lambda: layer(x, "nvfp4")),
        "nvfp4_quantize": median_ms(lambda: quantize_activation(x, "nvfp4")),
        "nvfp4_gemm": median_ms(lambda: nvfp4_gemm(x_nvfp4.packed, x_nvfp4.block_scale, x_nvfp4.global_scale,
                                                   w_nvfp4.packed, w_nvfp4.block_scale, w_nvfp4.global_scale,
                                                   out_dtype=torch.bfloat16)),
        "nvfp4_decode_weight": median_ms(lambda: nvfp4_decode(w_nvfp4.packed, w_nvfp4.block_scale)),
        "nvfp4_decode_activation": median_ms(lambda: nvfp4_decode(x_nvfp4.packed, x_nvfp4.block_scale)),
        "nvfp4_dense_gemm": median_ms(lambda: scaled_gemm(a_values, w_values, a_inverse, w_inverse,
                                                          out_dtype=torch.bfloat16)),
        "bf16_cublas_on_decoded": median_ms(lambda: torch.mm(a_values, w_values.t())),
    }
    errors = {p: relative_error(layer(x, p), reference_linear(x.float(), layer, p)) for p in ("fp8", "nvfp4")}
    gemm_keys = ("bf16", "fp8", "fp8_gemm", "nvfp4", "nvfp4_gemm", "nvfp4_dense_gemm", "bf16_cublas_on_decoded")
    result: dict[str, object] = {"shape": name, "m": m, "n": n, "k": k, "ms": times,
                                 "tflops": {key: flops / times[key] / 1e9 for key in gemm_keys},
                                 "speedup_vs_bf16": {p: times["bf16"] / times[p] for p in ("fp8", "nvfp4")},
                                 "relative_error_vs_reference": errors}
    del layer, a_values, w_values
    return result


def bench_activations(m: int, device: torch.device) -> dict[str, float]:
    """ms of the unfused activation ops + quantize vs the fused kernels, at m tokens of Llama-3.1-8B."""
    x = torch.randn(m, HIDDEN, device=device, dtype=torch.bfloat16)
    weight = torch.rand(HIDDEN, device=device, dtype=torch.bfloat16) + 0.5
    gate_up = torch.randn(m, 2 * INTERMEDIATE, device=device, dtype=torch.bfloat16)
    times = {"tokens": m}
    for precision in ("fp8", "nvfp4"):
        times[f"rmsnorm+{precision} unfused"] = median_ms(
            lambda: quantize_activation(rms_norm(x, weight, 1e-5), precision) if precision == "nvfp4"
            else fp8_quantize(rms_norm(x, weight, 1e-5)))
        times[f"rmsnorm+{precision} fused"] = median_ms(lambda: rms_norm_for_linear(x, weight, 1e-5, precision))
        times[f"silu_mul+{precision} unfused"] = median_ms(
            lambda: quantize_activation(silu_mul(gate_up), precision) if precision == "nvfp4"
            else fp8_quantize(silu_mul(gate_up)))
        times[f"silu_mul+{precision} fused"] = median_ms(lambda: silu_mul_for_linear(gate_up, precision))
    return times


def run_linears(device: torch.device) -> dict[str, object]:
    shapes = [bench_shape(name, n, k, parts, m, device) for m in TOKEN_COUNTS
              for name, n, k, parts in LLAMA_3_1_8B_LINEARS]
    return {"shapes": shapes, "activations": [bench_activations(m, device) for m in TOKEN_COUNTS]}


def format_linears(results: dict[str, object]) -> str:
    lines = [f"{'shape':<16}{'M':>6}{'N':>7}{'K':>7} | {'bf16 ms':>8}{'TF/s':>6} | {'fp8 ms':>7}{'x bf16':>7}"
             f"{'(q ms':>7}{'mm TF/s)':>9} | {'nvfp4 ms':>9}{'x bf16':>7}{'(q ms':>7}{'dec w/a ms':>12}"
             f"{'dense TF/s':>11}{'cuBLAS':>7}{'in-reg TF/s)':>13} | err fp8 / nvfp4"]
    for row in results["shapes"]:
        ms, tf, speed, err = row["ms"], row["tflops"], row["speedup_vs_bf16"], row["relative_error_vs_reference"]
        lines.append(f"{row['shape']:<16}{row['m']:>6}{row['n']:>7}{row['k']:>7} | "
                     f"{ms['bf16']:>8.3f}{tf['bf16']:>6.0f} | "
                     f"{ms['fp8']:>7.3f}{speed['fp8']:>7.2f}{ms['fp8_quantize']:>7.3f}{tf['fp8_gemm']:>9.0f} | "
                     f"{ms['nvfp4']:>9.3f}{speed['nvfp4']:>7.2f}{ms['nvfp4_quantize']:>7.3f}"
                     f"{ms['nvfp4_decode_weight']:>6.3f}/{ms['nvfp4_decode_activation']:<5.3f}"
                     f"{tf['nvfp4_dense_gemm']:>11.0f}{tf['bf16_cublas_on_decoded']:>7.0f}{tf['nvfp4_gemm']:>13.0f}"
                     f" | {err['fp8']:.1e} / {err['nvfp4']:.1e}")
    for times in results["activations"]:
        lines.append(f"activation ops at {times['tokens']} tokens (ms): " + ", ".join(
            f"{key} {value:.3f}" for key, value in times.items() if key != "tokens"))
    return "\n".join(lines)
