"""Our engine against plain transformers (bf16, SDPA) on the same synthetic Llama-3.1-8B, in one run.

    python -m benchmarks.baseline [--lengths 2048 8192 32768] [--decode-context 1024] [--decode-tokens 64]
                                  [--json baseline.json]

The reference a user would otherwise pick: transformers' LlamaForCausalLM built from the same
config.json (attn_implementation="sdpa", bf16) and filled with the same synthetic weights (the
generator of mixquant_serve.model.synthetic, consumed in the same order, so both models hold
identical tensors; nothing is downloaded). Both models live on the GPU side by side.

- prefill: one prompt of each length; ours is the bf16 forward through the paged KV cache plus the
  LM head on the last token; transformers' is `model(ids, use_cache=True, logits_to_keep=1)`, the
  call generate() makes first. CUDA-event medians. The last-token logits of the two are compared.
- decode, batch 1: transformers' `generate` (greedy, DynamicCache, eager) after a prompt of
  decode-context tokens, per token = (time for N new tokens - time for 1) / (N - 1); ours is the
  decode engine's step (runner with CUDA graphs, then the greedy argmax read back on the host, as
  the engine samples) at the same context, wall-clock over N steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.decode import BLOCK_SIZE, decode_batch
from benchmarks.measure import card, event_times_ms, median
from mixquant_serve.engine.cuda_graphs import DECODE_GRAPH_BATCH_SIZES
from mixquant_serve.engine.kv_cache import allocate_kv_cache
from mixquant_serve.engine.runner import ModelRunner
from mixquant_serve.model.attention import AttentionMetadata
from mixquant_serve.model.llama import LlamaForCausalLM
from mixquant_serve.model.loader import load_model
from mixquant_serve.model.synthetic import synthetic_config, synthetic_weights

MODEL = "synthetic:llama-3.1-8b"
DEFAULT_LENGTHS = (2048, 8192, 32768)


def transformers_model(device: torch.device) -> torch.nn.Module:
    """transformers' Llama-3.1-8B in bf16 with SDPA attention, holding the synthetic weights."""
    from transformers import LlamaConfig, LlamaForCausalLM as HFLlamaForCausalLM

    hf_config = synthetic_config(MODEL.removeprefix("synthetic:"))
    config = LlamaConfig(**hf_config, attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: an fp32 8B model would need 32 GB
    try:
        with torch.device(device):
            model = HFLlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in synthetic_weights(hf_config, device, torch.bfloat16):
            params.pop(name).copy_(tensor)
    if params:
        raise RuntimeError(f"transformers parameters not filled from the synthetic weights: {sorted(params)[:4]}")
    return model.eval()


def prefill_ours(model: LlamaForCausalLM, cache: torch.Tensor, input_ids: torch.Tensor):
    tokens = input_ids.shape[0]
    positions = torch.arange(tokens, device=input_ids.device)
    meta = AttentionMetadata(query_lens=[tokens], context_lens=[tokens],
                             block_tables=[list(range(-(-tokens // BLOCK_SIZE)))],
                             slot_blocks=positions // BLOCK_SIZE, slot_offsets=positions % BLOCK_SIZE,
                             block_size=BLOCK_SIZE)

    def run() -> torch.Tensor:
        with torch.inference_mode():
            hidden = model(input_ids, positions, cache, meta, "bf16")  # [tokens, hidden]
            return model.compute_logits(hidden[-1:])  # [1, vocab]

    return run


def prefill_transformers(hf_model: torch.nn.Module, input_ids: torch.Tensor):
    def run() -> torch.Tensor:
        with torch.inference_mode():
            return hf_model(input_ids[None], use_cache=True, logits_to_keep=1).logits[0].float()  # [1, vocab]

    return run


def bench_prefill(ours: LlamaForCausalLM, hf_model: torch.nn.Module, lengths: list[int], repeats: int,
                  device: torch.device) -> list[dict[str, object]]:
    cache = allocate_kv_cache(ours.config, -(-max(lengths) // BLOCK_SIZE), BLOCK_SIZE, torch.bfloat16, device)
    rows = []
    for tokens in lengths:
        generator = torch.Generator(device=device).manual_seed(tokens)
        input_ids = torch.randint(0, ours.config.vocab_size, (tokens,), device=device, generator=generator)
        row: dict[str, object] = {"tokens": tokens}
        try:
            run_ours, run_theirs = prefill_ours(ours, cache, input_ids), prefill_transformers(hf_model, input_ids)
            ours_ms = median(event_times_ms(run_ours, warmup=1, repeats=repeats))
            theirs_ms = median(event_times_ms(run_theirs, warmup=1, repeats=repeats))
            ours_logits, theirs_logits = run_ours(), run_theirs()
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            row["error"] = "out of memory"
            rows.append(row)
            continue
        row.update({
            "ours_ms": ours_ms, "transformers_ms": theirs_ms, "speedup_vs_transformers": theirs_ms / ours_ms,
            "ours_tokens_per_s": tokens / ours_ms * 1e3, "transformers_tokens_per_s": tokens / theirs_ms * 1e3,
            "last_logits_max_abs_diff": (ours_logits - theirs_logits).abs().max().item(),
            "same_argmax": bool(ours_logits.argmax() == theirs_logits.argmax()),
        })
        rows.append(row)
        print(f"prefill {tokens}: ours {ours_ms:.1f} ms, transformers {theirs_ms:.1f} ms, "
              f"x{theirs_ms / ours_ms:.2f}", flush=True)
        torch.cuda.empty_cache()
    return rows


def generate_seconds(hf_model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.inference_mode():
        hf_model.generate(input_ids[None], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - started


def bench_decode_batch1(ours: LlamaForCausalLM, hf_model: torch.nn.Module, context: int, new_tokens: int,
                        repeats: int, device: torch.device) -> dict[str, object]:
    generator = torch.Generator(device=device).manual_seed(context)
    input_ids = torch.randint(0, ours.config.vocab_size, (context,), device=device, generator=generator)
    generate_seconds(hf_model, input_ids, 2)  # warm-up
    one = median([generate_seconds(hf_model, input_ids, 1) for _ in range(repeats)])
    many = median([generate_seconds(hf_model, input_ids, new_tokens) for _ in range(repeats)])
    theirs_ms = (many - one) / (new_tokens - 1) * 1e3

    cache = allocate_kv_cache(ours.config, -(-context // BLOCK_SIZE), BLOCK_SIZE, torch.bfloat16, device)
    cache.normal_()
    runner = ModelRunner(ours, cache, BLOCK_SIZE, "bf16")
    runner.capture_decode_graphs(DECODE_GRAPH_BATCH_SIZES[:1])
    step = decode_batch(1, context, ours.config.vocab_size, seed=context)

    def decode_tokens() -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(new_tokens):
            runner.run(step).logits.argmax(dim=-1).tolist()  # the engine's greedy sample: a host read each step
        return time.perf_counter() - started

    decode_tokens()  # warm-up
    ours_ms = median([decode_tokens() for _ in range(repeats)]) / new_tokens * 1e3
    return {"context": context, "new_tokens": new_tokens, "ours_ms_per_token": ours_ms,
            "transformers_ms_per_token": theirs_ms, "speedup_vs_transformers": theirs_ms / ours_ms,
            "transformers_generate_1_s": one, f"transformers_generate_{new_tokens}_s": many}


def format_baseline(results: dict[str, object]) -> str:
    lines = [f"{'prefill tokens':>15}{'ours bf16 ms':>14}{'transformers ms':>17}{'ours x':>8}{'same argmax':>13}"]
    for r in results["prefill"]:
        if "error" in r:
            lines.append(f"{r['tokens']:>15}  {r['error']}")
            continue
        lines.append(f"{r['tokens']:>15}{r['ours_ms']:>14.1f}{r['transformers_ms']:>17.1f}"
                     f"{r['speedup_vs_transformers']:>8.2f}{str(r['same_argmax']):>13}")
    d = results["decode"]
    lines.append(f"decode batch 1 at {d['context']} tokens: ours {d['ours_ms_per_token']:.2f} ms/token, "
                 f"transformers generate {d['transformers_ms_per_token']:.2f} ms/token, "
                 f"ours x{d['speedup_vs_transformers']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="prompt lengths")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each measurement")
    parser.add_argument("--decode-context", type=int, default=1024, help="prompt tokens before the decode")
    parser.add_argument("--decode-tokens", type=int, default=64, help="new tokens of the decode measurement")
    parser.add_argument("--json", type=Path, default=Path("baseline.json"), help="where to write all results")
    args = parser.parse_args(argv)
    if args.decode_tokens < 2:
        parser.error("--decode-tokens must be >= 2")
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.baseline needs a CUDA GPU")
    import transformers

    device = torch.device("cuda")
    results: dict[str, object] = {"card": card(), "model": MODEL, "transformers": transformers.__version__}
    print(f"card: {results['card']}, transformers {transformers.__version__}", flush=True)
    ours = load_model(MODEL, device, torch.bfloat16, {"bf16"}, progress=False).model
    hf_model = transformers_model(device)
    print(f"both models loaded, {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated", flush=True)
    results["prefill"] = bench_prefill(ours, hf_model, args.lengths, args.repeats, device)
    results["decode"] = bench_decode_batch1(ours, hf_model, args.decode_context, args.decode_tokens, args.repeats,
                                            device)
    args.json.write_text(json.dumps(results, indent=1))
    print(format_baseline(results), flush=True)


if __name__ == "__main__":
    main()
