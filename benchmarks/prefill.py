"""Prefill speed of synthetic Llama-3.1-8B in bf16, fp8 and nvfp4, measured side by side in one run.

    python -m benchmarks.prefill [--lengths 2048 8192 32768] [--repeats 3] [--json prefill.json] [--skip-linears]

One process loads the model once, prepared for all three precisions (the linears keep a bf16, an
fp8 and an NVFP4 copy of each weight), then for each prompt length runs a single-sequence prefill
forward (embeddings, 32 blocks with paged KV-cache writes and causal attention, final norm; no LM
head) in each precision, timed with CUDA events after a warm-up (which also autotunes the NVFP4
GEMM for the length). Before that it measures the card's ceilings (matmul peak per precision,
copy bandwidth) and the per-linear micro-benchmark, so every ratio in the printed tables and the
JSON comes from one run on one card.

The model runs as the engine runs it: fused qkv and gate_up projections, RMSNorm and SwiGLU handing
fp8 / nvfp4 activations to the next linear from one fused kernel, and on sm_90 the nvfp4 linears
decode both operands to bf16 and run a dense GEMM from 512 tokens on (quant/linear.py). The peak
transient memory of each forward (above what is resident) is recorded, scratch included.

Attention is timed on its own too (`attention_probe`: one layer's causal SDPA call, exactly as
model/attention.py makes it, 4-D so CUDA takes the flash backend), which tells how much of each
prefill no linear-layer precision can speed up. An out-of-memory prefill is recorded as such and
the run goes on.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.linears import format_linears, run_linears
from benchmarks.measure import card, copy_bandwidth, enqueue_ms, event_times_ms, matmul_ceilings, median, median_ms
from mixquant_serve.engine.kv_cache import allocate_kv_cache
from mixquant_serve.model.attention import AttentionMetadata
from mixquant_serve.model.llama import LlamaForCausalLM
from mixquant_serve.model.loader import load_model

MODEL = "synthetic:llama-3.1-8b"
PRECISIONS = ("bf16", "fp8", "nvfp4")
BLOCK_SIZE = 16
DEFAULT_LENGTHS = (2048, 8192, 32768)


def linear_flops_per_token(model: LlamaForCausalLM) -> int:
    """2 x the weights of the transformer blocks' linears (the quantized ones; LM head excluded)."""
    return 2 * sum(linear.in_features * linear.out_features for linear in model.quant_linears())


def attention_flops(model: LlamaForCausalLM, tokens: int) -> int:
    """Causal attention of one fresh sequence: QK^T and PV over the lower triangle, every layer."""
    config = model.config
    return 2 * 2 * config.num_layers * config.num_heads * config.head_dim * tokens * (tokens + 1) // 2


def weight_bytes(model: LlamaForCausalLM, precision: str) -> int:
    return sum(linear.weight_bytes(precision) for linear in model.quant_linears())


def prefill_runner(model: LlamaForCausalLM, cache: torch.Tensor, tokens: int, precision: str, device: torch.device):
    """A closure running one fresh prefill of `tokens` random token ids into blocks 0.. of cache."""
    generator = torch.Generator(device=device).manual_seed(tokens)
    input_ids = torch.randint(0, model.config.vocab_size, (tokens,), device=device, generator=generator)
    positions = torch.arange(tokens, device=device)
    num_blocks = -(-tokens // BLOCK_SIZE)
    meta = AttentionMetadata(query_lens=[tokens], context_lens=[tokens], block_tables=[list(range(num_blocks))],
                             slot_blocks=positions // BLOCK_SIZE, slot_offsets=positions % BLOCK_SIZE,
                             block_size=BLOCK_SIZE)

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model(input_ids, positions, cache, meta, precision)

    return run


def attention_probe(model: LlamaForCausalLM, tokens: int, device: torch.device) -> dict[str, object]:
    """One layer's causal attention as model/attention.py calls SDPA ([1, heads, T, D], enable_gqa)."""
    config = model.config
    # q: [1, heads, tokens, head_dim]; k, v: [1, kv_heads, tokens, head_dim]
    q = torch.randn(1, config.num_heads, tokens, config.head_dim, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, config.num_kv_heads, tokens, config.head_dim, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)

    def call() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    result: dict[str, object] = {"tokens": tokens, "flop": attention_flops(model, tokens) // config.num_layers}
    torch.cuda.empty_cache()
    try:
        call()
        result["ms"] = median_ms(call)
        result["tflops"] = result["flop"] / result["ms"] / 1e9
        result["all_layers_ms"] = result["ms"] * config.num_layers
    except torch.OutOfMemoryError:
        result["error"] = "out of memory"
    return result


def bench_prefill(model: LlamaForCausalLM, lengths: list[int], repeats: int, device: torch.device,
                  matmul_peak: dict[str, float]) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    cache = allocate_kv_cache(model.config, -(-max(lengths) // BLOCK_SIZE), BLOCK_SIZE, torch.bfloat16, device)
    per_token = linear_flops_per_token(model)
    rows, probes = [], []
    for tokens in lengths:
        probe = attention_probe(model, tokens, device)
        probes.append(probe)
        outputs, bf16_ms = {}, None
        for precision in PRECISIONS:
            run = prefill_runner(model, cache, tokens, precision, device)
            try:
                times = event_times_ms(run, warmup=2, repeats=repeats)
                host_ms = enqueue_ms(run)
                torch.cuda.synchronize()
                resident = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                outputs[precision] = run()[-1].float()
                transient = torch.cuda.max_memory_allocated() - resident
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append({"tokens": tokens, "precision": precision, "error": "out of memory"})
                continue
            ms = median(times)
            bf16_ms = ms if precision == "bf16" else bf16_ms
            linear_flops, attn_flops = per_token * tokens, attention_flops(model, tokens)
            row = {
                "tokens": tokens, "precision": precision, "ms": ms, "all_ms": times, "host_enqueue_ms": host_ms,
                "tokens_per_s": tokens / ms * 1e3,
                "speedup_vs_bf16": bf16_ms / ms if bf16_ms is not None else None,
                "linear_tflop": linear_flops / 1e12, "attention_tflop": attn_flops / 1e12,
                "model_tflops": (linear_flops + attn_flops) / ms / 1e9,
                "matmul_peak_tflops": matmul_peak[precision],
                "transient_gib": transient / 2**30,  # activations, KV writes and scratch of one forward
            }
            if "all_layers_ms" in probe:
                row["attention_share"] = probe["all_layers_ms"] / ms
            rows.append(row)
        # Sanity: the quantized prefills see the same prompt and stay near bf16 (random weights).
        for precision in ("fp8", "nvfp4"):
            if precision in outputs and "bf16" in outputs:
                cosine = F.cosine_similarity(outputs[precision], outputs["bf16"], dim=0).item()
                row = next(r for r in rows if r["tokens"] == tokens and r["precision"] == precision)
                row["last_hidden_cosine_vs_bf16"] = cosine
    return rows, probes


def format_prefill(rows: list[dict[str, object]], probes: list[dict[str, object]], weights: dict[str, int]) -> str:
    lines = [f"{'tokens':>7} {'precision':<9}{'ms':>9}{'host ms':>9}{'tokens/s':>11}{'x bf16':>8}{'model TF/s':>11}"
             f"{'peak TF/s':>10}{'cos(bf16)':>10}{'attn share':>11}{'transient GiB':>14}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['tokens']:>7} {r['precision']:<9} {r['error']}")
            continue
        cosine = r.get("last_hidden_cosine_vs_bf16")
        share = r.get("attention_share")
        lines.append(f"{r['tokens']:>7} {r['precision']:<9}{r['ms']:>9.1f}{r['host_enqueue_ms']:>9.1f}"
                     f"{r['tokens_per_s']:>11.0f}{r['speedup_vs_bf16']:>8.2f}{r['model_tflops']:>11.0f}"
                     f"{r['matmul_peak_tflops']:>10.0f}{'' if cosine is None else f'{cosine:.4f}':>10}"
                     f"{'' if share is None else f'{share:.0%}':>11}{r['transient_gib']:>14.2f}")
    for p in probes:
        timing = (f"{p['ms']:.2f} ms ({p['tflops']:.0f} TF/s), {p['all_layers_ms']:.1f} ms over all layers"
                  if "ms" in p else p.get("error"))
        lines.append(f"attention one layer, {p['tokens']} tokens: {timing}")
    lines.append("block-linear weight memory: " + ", ".join(
        f"{p} {weights[p] / 2**30:.2f} GiB ({weights[p] / weights['bf16']:.3f}x bf16)" for p in PRECISIONS))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="prompt lengths")
    parser.add_argument("--repeats", type=int, default=3, help="timed prefills per length and precision")
    parser.add_argument("--skip-linears", action="store_true", help="skip the per-linear micro-benchmark")
    parser.add_argument("--json", type=Path, default=Path("prefill.json"), help="where to write all results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.prefill needs a CUDA GPU")
    device = torch.device("cuda")
    results: dict[str, object] = {"card": card(), "model": MODEL}
    print(f"card: {results['card']}", flush=True)

    results["matmul_ceilings"] = matmul_ceilings(device)
    results["copy"] = copy_bandwidth(device)
    for c in results["matmul_ceilings"]:
        print(f"ceiling {c['op']:<24} {c['m']}x{c['n']}x{c['k']}: {c['tflops']:.0f} TFLOP/s", flush=True)
    print(f"ceiling copy: {results['copy']['tb_per_s']:.2f} TB/s (read + write)", flush=True)
    peak = {c["op"].split()[0]: c["tflops"] for c in results["matmul_ceilings"]
            if (c["m"], c["n"], c["k"]) == (8192, 4096, 4096)}
    # nvfp4 runs on fp16 tensor cores on sm_90: its peak is the fp16 product's
    matmul_peak = {"bf16": peak["bf16"], "fp8": peak["fp8"], "nvfp4": peak["fp16"]}

    if not args.skip_linears:
        results["linears"] = run_linears(device)
        print(format_linears(results["linears"]), flush=True)
        args.json.write_text(json.dumps(results, indent=1))

    started = time.perf_counter()
    loaded = load_model(MODEL, device, torch.bfloat16, set(PRECISIONS), progress=False)
    results["load_seconds"] = time.perf_counter() - started
    weights = {p: weight_bytes(loaded.model, p) for p in PRECISIONS}
    results["block_linear_weight_bytes"] = weights
    print(f"loaded {MODEL} for {PRECISIONS} in {results['load_seconds']:.0f} s, "
          f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated", flush=True)
    results["prefill"], results["attention"] = bench_prefill(loaded.model, args.lengths, args.repeats, device,
                                                             matmul_peak)
    args.json.write_text(json.dumps(results, indent=1))
    print(format_prefill(results["prefill"], results["attention"], weights), flush=True)


if __name__ == "__main__":
    main()
