"""Decode speed of synthetic Llama-3.1-8B in BF16 through the engine's runner, against the HBM roofline.

    python -m benchmarks.decode [--batches 1 8 32 128] [--contexts 1024 8192] [--repeats 20] [--json decode.json]

One process loads the model once (bf16 weights only), measures the card's copy bandwidth, allocates
one KV cache for the largest (batch, context) that fits and fills it with random values, captures
the decode CUDA graphs the decode engine uses (batch sizes 1..128), then for each batch and context
times one decode step: every sequence computes one new token at position context - 1 over a context
of `context` tokens (the same step, repeated; the KV store rewrites the same slot). The step is
`ModelRunner.run` as the decode engine calls it: host-side batch preparation, embedding, 32 blocks
with the fused KV store and the Triton paged-attention kernel, final norm and the LM head, with and
without CUDA graphs. Times are CUDA-event medians, so host work that keeps the GPU waiting counts.

The roofline of a step is the bytes it must read once, over the measured device-to-device copy
bandwidth (read + write bytes a second, as every ratio in docs/perf-notes.md uses):

    weight bytes = every parameter but the embedding table (batch rows of it), bf16
    KV bytes     = batch x context x layers x 2 (k, v) x kv_heads x head_dim x 2 bytes

The attention kernel alone is also timed on one layer (L2 flushed), as the bandwidth it reaches
over its own KV bytes. A (batch, context) whose KV does not fit on the card is recorded as such.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.measure import card, copy_bandwidth, enqueue_ms, event_times_ms, median, median_ms
from mixquant_serve.engine.cuda_graphs import DECODE_GRAPH_BATCH_SIZES
from mixquant_serve.engine.kv_cache import allocate_kv_cache, block_bytes
from mixquant_serve.engine.runner import ModelRunner
from mixquant_serve.engine.sampling import SamplingParams
from mixquant_serve.engine.scheduler import ScheduledBatch
from mixquant_serve.engine.sequence import Sequence
from mixquant_serve.model.llama import LlamaForCausalLM
from mixquant_serve.model.loader import load_model

MODEL = "synthetic:llama-3.1-8b"
BLOCK_SIZE = 16
DEFAULT_BATCHES = (1, 8, 32, 128)
DEFAULT_CONTEXTS = (1024, 8192)
HEADROOM_BYTES = 6 << 30  # activations, logits, graph pool and the attention probe's buffers
GREEDY = SamplingParams(max_tokens=1, temperature=0.0)


def decode_weight_bytes(model: LlamaForCausalLM, batch: int) -> int:
    """Bytes of weights one decode step reads: all parameters, but only `batch` rows of the embeddings."""
    embedding = model.model.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied lm_head is listed once
    if model.config.tie_word_embeddings:
        return total + batch * embedding.shape[1] * embedding.element_size()
    return total - embedding.numel() * embedding.element_size() + batch * embedding.shape[1] * embedding.element_size()


def kv_bytes(model: LlamaForCausalLM, batch: int, context: int, dtype: torch.dtype) -> int:
    config = model.config
    element = torch.empty((), dtype=dtype).element_size()
    return batch * context * config.num_layers * 2 * config.num_kv_heads * config.head_dim * element


def decode_batch(batch: int, context: int, vocab: int, seed: int) -> ScheduledBatch:
    """`batch` generating sequences of `context` tokens whose first context - 1 are computed, each on its
    own consecutive blocks from block 0: the batch's one decode step computes the last token."""
    generator = torch.Generator().manual_seed(seed)
    blocks_per_seq = -(-context // BLOCK_SIZE)
    seqs = []
    for i in range(batch):
        tokens = torch.randint(0, vocab, (context,), generator=generator).tolist()
        seq = Sequence(f"decode-{i}", tokens, context, sampling=GREEDY)
        seq.block_table = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
        seq.num_computed_tokens = context - 1
        seqs.append(seq)
    return ScheduledBatch(seqs, [1] * batch)


def attention_probe(model: LlamaForCausalLM, cache: torch.Tensor, batch: int, context: int,
                    num_splits: int) -> dict[str, float]:
    """One layer's paged-attention kernel over this batch's KV (blocks as decode_batch lays them out)."""
    from kernels.paged_attention import paged_attention_decode

    config = model.config
    blocks_per_seq = -(-context // BLOCK_SIZE)
    tables = torch.arange(batch * blocks_per_seq, dtype=torch.int32, device=cache.device).view(batch, blocks_per_seq)
    lens = torch.full((batch,), context, dtype=torch.int32, device=cache.device)
    q = torch.randn(batch, config.num_heads, config.head_dim, dtype=cache.dtype, device=cache.device)
    ms = median_ms(lambda: paged_attention_decode(q, cache, 0, tables, lens, config.head_dim**-0.5, num_splits))
    layer_bytes = kv_bytes(model, batch, context, cache.dtype) // config.num_layers
    return {"num_splits": num_splits, "ms": ms, "tb_per_s": layer_bytes / ms / 1e9,
            "all_layers_ms": ms * config.num_layers}


def bench_decode(model: LlamaForCausalLM, batches: list[int], contexts: list[int], repeats: int,
                 copy_tb_per_s: float, device: torch.device) -> list[dict[str, object]]:
    from kernels.paged_attention import decode_num_splits

    config = model.config
    dtype = model.dtype
    blocks_needed = {(b, c): b * -(-c // BLOCK_SIZE) for b in batches for c in contexts}
    free, _ = torch.cuda.mem_get_info()
    block = block_bytes(config, BLOCK_SIZE, dtype)
    affordable = max(0, (free - HEADROOM_BYTES) // block)
    fitting = [n for n in blocks_needed.values() if n <= affordable]
    num_blocks = max(fitting) if fitting else 1
    cache = allocate_kv_cache(config, num_blocks, BLOCK_SIZE, dtype, device)
    cache.normal_()  # random KV: never benchmark on zeros
    print(f"KV cache: {num_blocks} blocks of {BLOCK_SIZE} tokens, {num_blocks * block / 2**30:.1f} GiB", flush=True)

    started = time.perf_counter()
    graphs = ModelRunner(model, cache, BLOCK_SIZE, "bf16")
    graphs.capture_decode_graphs(DECODE_GRAPH_BATCH_SIZES)
    capture_s = time.perf_counter() - started
    print(f"captured decode graphs {DECODE_GRAPH_BATCH_SIZES} in {capture_s:.1f} s", flush=True)
    eager = ModelRunner(model, cache, BLOCK_SIZE, "bf16")
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count

    rows = []
    for context in contexts:
        for batch in batches:
            row: dict[str, object] = {"batch": batch, "context": context}
            if blocks_needed[(batch, context)] > num_blocks:
                row["error"] = (f"KV of {blocks_needed[(batch, context)] * block / 2**30:.0f} GiB does not fit "
                                f"({free / 2**30:.0f} GiB free after loading)")
                rows.append(row)
                continue
            step = decode_batch(batch, context, config.vocab_size, seed=batch * 100003 + context)
            with torch.inference_mode():
                graph_logits = graphs.run(step).logits
                eager_logits = eager.run(step).logits
            graph_times = event_times_ms(lambda: graphs.run(step), warmup=3, repeats=repeats)
            eager_times = event_times_ms(lambda: eager.run(step), warmup=3, repeats=max(5, repeats // 4))
            weights, kv = decode_weight_bytes(model, batch), kv_bytes(model, batch, context, dtype)
            roofline_ms = (weights + kv) / copy_tb_per_s / 1e9
            graph_ms, eager_ms = median(graph_times), median(eager_times)
            padded = graphs.decode_graphs.padded_batch_size(batch)
            row.update({
                "graph_ms": graph_ms, "graph_all_ms": graph_times, "eager_ms": eager_ms,
                "host_enqueue_graph_ms": enqueue_ms(lambda: graphs.run(step)),
                "host_enqueue_eager_ms": enqueue_ms(lambda: eager.run(step)),
                "weight_bytes": weights, "kv_bytes": kv, "roofline_ms": roofline_ms,
                "graph_x_roofline": graph_ms / roofline_ms, "eager_x_roofline": eager_ms / roofline_ms,
                "tokens_per_s": batch / graph_ms * 1e3,
                "graph_vs_eager_max_abs_logit_diff": (graph_logits - eager_logits).abs().max().item(),
                "graph_vs_eager_argmax_agreement": (graph_logits.argmax(-1) == eager_logits.argmax(-1))
                .float().mean().item(),
                "attention_graph_splits": attention_probe(
                    model, cache, batch, context, graphs.decode_graphs.num_splits[padded]),
                "attention_policy_splits": attention_probe(
                    model, cache, batch, context, decode_num_splits(batch, config.num_kv_heads, context, num_sms)),
            })
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def format_row(r: dict[str, object]) -> str:
    if "error" in r:
        return f"{r['batch']:>6} {r['context']:>8}  {r['error']}"
    attention = r["attention_graph_splits"]
    return (f"{r['batch']:>6} {r['context']:>8}{r['graph_ms']:>10.2f}{r['eager_ms']:>10.2f}{r['roofline_ms']:>10.2f}"
            f"{r['graph_x_roofline']:>9.2f}{r['tokens_per_s']:>11.0f}{r['host_enqueue_graph_ms']:>9.2f}"
            f"{attention['all_layers_ms']:>10.2f}{attention['tb_per_s']:>9.2f}{attention['num_splits']:>7}"
            f"{r['graph_vs_eager_argmax_agreement']:>8.2f}")


HEADER = (f"{'batch':>6} {'context':>8}{'graph ms':>10}{'eager ms':>10}{'roof ms':>10}{'x roof':>9}{'tokens/s':>11}"
          f"{'host ms':>9}{'attn ms':>10}{'attn TB/s':>9}{'splits':>7}{'argmax=':>8}")


def format_decode(rows: list[dict[str, object]], copy: dict[str, object]) -> str:
    lines = [f"roofline = (weights + KV bytes) / copy bandwidth {copy['tb_per_s']:.2f} TB/s; "
             "attn = paged-attention kernel alone, all layers (graph's split count)", HEADER]
    lines += [format_row(r) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=list(DEFAULT_BATCHES), help="sequences a step")
    parser.add_argument("--contexts", type=int, nargs="+", default=list(DEFAULT_CONTEXTS), help="context tokens")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per (batch, context) with graphs")
    parser.add_argument("--json", type=Path, default=Path("decode.json"), help="where to write all results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.decode needs a CUDA GPU")
    device = torch.device("cuda")
    results: dict[str, object] = {"card": card(), "model": MODEL, "block_size": BLOCK_SIZE}
    print(f"card: {results['card']}", flush=True)
    results["copy"] = copy_bandwidth(device)
    print(f"ceiling copy: {results['copy']['tb_per_s']:.2f} TB/s (read + write)", flush=True)
    started = time.perf_counter()
    loaded = load_model(MODEL, device, torch.bfloat16, {"bf16"}, progress=False)
    results["load_seconds"] = time.perf_counter() - started
    print(f"loaded {MODEL} in {results['load_seconds']:.0f} s, {torch.cuda.memory_allocated() / 2**30:.1f} GiB",
          flush=True)
    print(HEADER, flush=True)
    results["decode"] = bench_decode(loaded.model, args.batches, args.contexts, args.repeats,
                                     results["copy"]["tb_per_s"], device)
    args.json.write_text(json.dumps(results, indent=1))
    print(format_decode(results["decode"], results["copy"]), flush=True)


if __name__ == "__main__":
    main()
