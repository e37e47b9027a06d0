"""Per-linear micro-benchmark: bf16 F.linear vs the fp8 and nvfp4 QuantLinear paths (activation
quantization included), with the quantize and GEMM parts timed on their own.

Shapes are Llama-3.1-8B's linears [N = out, K = in]: the model's own (q/o, k/v, gate/up, down) and
the fused qkv / gate_up shapes an engine with fused projections would run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.measure import median_ms
from kernels.fp8_quantize import fp8_quantize
from kernels.nvfp4_gemm import GemmConfig, nvfp4_gemm
from mixquant_serve.quant.linear import QuantLinear, quantize_activation, reference_linear

LLAMA_3_1_8B_LINEARS: tuple[tuple[str, int, int], ...] = (
    ("qkv (fused)", 6144, 4096),
    ("q / o", 4096, 4096),
    ("k / v", 1024, 4096),
    ("gate_up (fused)", 28672, 4096),
    ("gate / up", 14336, 4096),
    ("down", 4096, 14336),
)
TOKEN_COUNTS = (2048, 8192)
# One fixed tile for comparing the two NVFP4 decoders on equal terms.
DECODER_COMPARISON_CONFIG = GemmConfig(128, 128, 64, 8, 4)
DECODER_COMPARISON_SHAPES = (("q / o", 4096, 4096), ("gate / up", 14336, 4096))


def make_layer(n: int, k: int, device: torch.device) -> QuantLinear:
    """A bf16 QuantLinear [n, k] with normal(0, 0.02) weights, prepared for bf16, fp8 and nvfp4."""
    layer = QuantLinear(k, n, dtype=torch.bfloat16, device=device)
    layer.weight.normal_(0.0, 0.02)
    layer.prepare(["bf16", "fp8", "nvfp4"])
    return layer


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y.float() - reference.float()).norm() / reference.float().norm()).item()


def bench_shape(name: str, n: int, k: int, m: int, device: torch.device) -> dict[str, object]:
    """Times of one linear shape at m tokens, in ms, with TFLOP/s and the errors against the reference."""
    layer = make_layer(n, k, device)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    flops = 2 * m * n * k
    x_fp8, x_scale = fp8_quantize(x)
    x_nvfp4 = quantize_activation(x, "nvfp4")
    w_nvfp4 = layer.quantized_weight("nvfp4")

    def nvfp4_gemm_only() -> torch.Tensor:
        return nvfp4_gemm(x_nvfp4.packed, x_nvfp4.block_scale, x_nvfp4.global_scale, w_nvfp4.packed,
                          w_nvfp4.block_scale, w_nvfp4.global_scale, out_dtype=torch.bfloat16)

    times = {
        "bf16": median_ms(lambda: F.linear(x, layer.weight)),
        "fp8": median_ms(lambda: layer(x, "fp8")),
        "fp8_quantize": median_ms(lambda: fp8_quantize(x)),
        "fp8_gemm": median_ms(lambda: torch._scaled_mm(x_fp8, layer.weight_fp8_data.t(), scale_a=x_scale,
                                                       scale_b=layer.weight_fp8_scale.t(), out_dtype=torch.bfloat16)),
        "nvfp4": median_ms(lambda: layer(x, "nvfp4")),
        "nvfp4_quantize": median_ms(lambda: quantize_activation(x, "nvfp4")),
        "nvfp4_gemm": median_ms(nvfp4_gemm_only),
    }
    errors = {p: relative_error(layer(x, p), reference_linear(x.float(), layer, p)) for p in ("fp8", "nvfp4")}
    result: dict[str, object] = {"shape": name, "m": m, "n": n, "k": k, "ms": times,
                                 "tflops": {key: flops / ms / 1e9 for key, ms in times.items()
                                            if not key.endswith("quantize")},
                                 "speedup_vs_bf16": {p: times["bf16"] / times[p] for p in ("fp8", "nvfp4")},
                                 "relative_error_vs_reference": errors}
    del layer
    return result


def bench_decoders(m: int, device: torch.device) -> list[dict[str, object]]:
    """The NVFP4 GEMM with the PTX and the arithmetic decoder, one fixed tile, same inputs."""
    rows = []
    for name, n, k in DECODER_COMPARISON_SHAPES:
        layer = make_layer(n, k, device)
        x = quantize_activation(torch.randn(m, k, device=device, dtype=torch.bfloat16), "nvfp4")
        w = layer.quantized_weight("nvfp4")
        outputs, row = {}, {"shape": name, "m": m, "n": n, "k": k, "config": str(DECODER_COMPARISON_CONFIG)}
        for decoder, with_ptx in (("ptx", True), ("arith", False)):
            def run(with_ptx: bool = with_ptx) -> torch.Tensor:
                return nvfp4_gemm(x.packed, x.block_scale, x.global_scale, w.packed, w.block_scale, w.global_scale,
                                  out_dtype=torch.float32, config=DECODER_COMPARISON_CONFIG, decode_with_ptx=with_ptx)
            outputs[decoder] = run()
            ms = median_ms(run)
            row[f"{decoder}_ms"] = ms
            row[f"{decoder}_tflops"] = 2 * m * n * k / ms / 1e9
        row["max_abs_difference"] = (outputs["ptx"] - outputs["arith"]).abs().max().item()
        rows.append(row)
        del layer
    return rows


def run_linears(device: torch.device) -> dict[str, object]:
    shapes = [bench_shape(name, n, k, m, device) for m in TOKEN_COUNTS for name, n, k in LLAMA_3_1_8B_LINEARS]
    return {"shapes": shapes, "nvfp4_decoders": bench_decoders(max(TOKEN_COUNTS), device)}


def format_linears(results: dict[str, object]) -> str:
    lines = [f"{'shape':<16}{'M':>6}{'N':>7}{'K':>7} | {'bf16 ms':>8}{'TF/s':>6} | {'fp8 ms':>7}{'x bf16':>7}"
             f"{'(q ms':>7}{'mm TF/s)':>9} | {'nvfp4 ms':>9}{'x bf16':>7}{'(q ms':>7}{'gemm TF/s)':>11}"
             f" | err fp8 / nvfp4"]
    for row in results["shapes"]:
        ms, tf, speed, err = row["ms"], row["tflops"], row["speedup_vs_bf16"], row["relative_error_vs_reference"]
        lines.append(f"{row['shape']:<16}{row['m']:>6}{row['n']:>7}{row['k']:>7} | "
                     f"{ms['bf16']:>8.3f}{tf['bf16']:>6.0f} | "
                     f"{ms['fp8']:>7.3f}{speed['fp8']:>7.2f}{ms['fp8_quantize']:>7.3f}{tf['fp8_gemm']:>9.0f} | "
                     f"{ms['nvfp4']:>9.3f}{speed['nvfp4']:>7.2f}{ms['nvfp4_quantize']:>7.3f}{tf['nvfp4_gemm']:>11.0f}"
                     f" | {err['fp8']:.1e} / {err['nvfp4']:.1e}")
    lines.append("NVFP4 GEMM decoders at one tile " + str(DECODER_COMPARISON_CONFIG))
    for row in results["nvfp4_decoders"]:
        lines.append(f"  {row['shape']:<12} M={row['m']} N={row['n']} K={row['k']}: ptx {row['ptx_ms']:.3f} ms "
                     f"({row['ptx_tflops']:.0f} TF/s), arith {row['arith_ms']:.3f} ms "
                     f"({row['arith_tflops']:.0f} TF/s), "
                     f"max |diff| {row['max_abs_difference']:.2e}")
    return "\n".join(lines)
