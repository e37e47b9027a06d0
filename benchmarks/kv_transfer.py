"""KV transfer between two processes with our NIXL transport: GB/s per request size and block size.

    source process (spawned)                       this process
    cache on --source-device, seeded      NIXL     cache on --dest-device
    NixlTransport.register_cache   ==== READ ====> NixlTransport.read_blocks(scattered block ids)

The caches have the model's real block layout ([num_blocks, layers, 2, block_size, kv_heads,
head_dim], one block = one contiguous span). For each block size and prompt length the reader pulls
the prompt's blocks at shuffled, non-adjacent ids (NIXL cannot merge them into fewer descriptors,
as in a long-running cache), checks every pulled block's checksum against the source's, and times
it. The reference row reads one contiguous run of blocks (NIXL merges it into a single descriptor):
the raw bandwidth the link gives this transport.

    python -m benchmarks.kv_transfer --source-device cuda:0 --dest-device cuda:1 --out kv-transfer.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

import torch

from mixquant_serve.engine.kv_cache import allocate_kv_cache
from mixquant_serve.model.config import ModelConfig
from mixquant_serve.model.synthetic import synthetic_config
from mixquant_serve.transfer.nixl import NixlTransport

CHILD_WAIT_S = 300.0
TIMEOUT_S = 60.0


def block_checksums(cache: torch.Tensor) -> list[int]:
    """An exact fingerprint per block: the sum of its bytes read as int16 (bf16/fp32 bit patterns)."""
    flat = cache.view(cache.shape[0], -1).view(torch.int16)
    return flat.to(torch.int64).sum(dim=1).tolist()


def seeded_cache(config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: str,
                 seed: int) -> torch.Tensor:
    cache = allocate_kv_cache(config, num_blocks, block_size, dtype, torch.device(device))
    generator = torch.Generator(device=cache.device).manual_seed(seed)
    cache.normal_(generator=generator)
    return cache


def run_source(name: str, model: str, num_blocks: int, block_size: int, dtype: str, device: str, seed: int,
               to_parent: multiprocessing.Queue, stop: multiprocessing.Event) -> None:
    """Child: a seeded cache registered with NIXL; sends metadata and checksums, then waits to be stopped."""
    config = ModelConfig.from_hf(synthetic_config(model))
    cache = seeded_cache(config, num_blocks, block_size, getattr(torch, dtype), device, seed)
    transport = NixlTransport(name)
    transport.register_cache(cache)
    to_parent.put((transport.metadata(), block_checksums(cache)))
    while not stop.is_set():
        transport.get_notifications()  # drained, as a prefill replica does
        time.sleep(0.01)
    transport.close()


def measure_block_size(args: argparse.Namespace, block_size: int, progress) -> list[dict]:
    config = ModelConfig.from_hf(synthetic_config(args.model))
    dtype = getattr(torch, args.dtype)
    max_blocks = -(-max(args.tokens) // block_size)
    num_blocks = 2 * max_blocks + 1  # room for scattered ids
    context = multiprocessing.get_context("spawn")
    to_parent, stop = context.Queue(), context.Event()
    source_name = f"kvbench-source-{uuid.uuid4().hex[:8]}"
    process = context.Process(target=run_source, args=(source_name, args.model, num_blocks, block_size, args.dtype,
                                                        args.source_device, 1, to_parent, stop))
    process.start()
    rows: list[dict] = []
    dest = NixlTransport(f"kvbench-dest-{uuid.uuid4().hex[:8]}")
    try:
        metadata, source_sums = to_parent.get(timeout=CHILD_WAIT_S)
        dest_cache = allocate_kv_cache(config, num_blocks, block_size, dtype, torch.device(args.dest_device))
        dest.register_cache(dest_cache)
        peer = dest.add_peer(metadata)
        block_bytes = dest_cache[0].numel() * dest_cache.element_size()
        rng = random.Random(block_size)
        cases = [("scattered", tokens) for tokens in args.tokens] + [("contiguous", max(args.tokens))]
        for pattern, tokens in cases:
            count = -(-tokens // block_size)
            if pattern == "scattered":  # every other id, shuffled: no two pulled blocks adjacent on either side
                remote = rng.sample(range(0, num_blocks, 2), count)
                local = rng.sample(range(0, num_blocks, 2), count)
            else:
                remote, local = list(range(count)), list(range(count))
            seconds = []
            for repeat in range(args.warmup + args.repeats):
                dest_cache.zero_()
                if dest_cache.is_cuda:
                    torch.cuda.synchronize(dest_cache.device)
                stats = dest.read_blocks(peer, remote, local, f"kvbench-{repeat}".encode(), TIMEOUT_S)
                if repeat >= args.warmup:
                    seconds.append(stats.seconds)
            got = block_checksums(dest_cache[local])
            if got != [source_sums[r] for r in remote]:
                raise AssertionError(f"block_size {block_size}, {tokens} tokens ({pattern}): pulled blocks differ")
            nbytes = count * block_bytes
            best, median = min(seconds), statistics.median(seconds)
            rows.append({
                "block_size": block_size,
                "pattern": pattern,
                "tokens": count * block_size,
                "blocks": count,
                "block_bytes": block_bytes,
                "bytes": nbytes,
                "median_ms": median * 1e3,
                "best_ms": best * 1e3,
                "gb_per_s_median": nbytes / median / 1e9,
                "gb_per_s_best": nbytes / best / 1e9,
                "checked": True,
            })
            progress(rows[-1])
    finally:
        stop.set()
        dest.close()
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'block':>6} {'pattern':>10} {'tokens':>7} {'MiB':>8} {'median ms':>10} {'GB/s med':>9} {'GB/s best':>9}"]
    for r in rows:
        lines.append(
            f"{r['block_size']:>6} {r['pattern']:>10} {r['tokens']:>7} {r['bytes'] / 2**20:>8.1f} {r['median_ms']:>10.3f} "
            f"{r['gb_per_s_median']:>9.1f} {r['gb_per_s_best']:>9.1f}"
        )
    return "\n".join(lines)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kv_transfer", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3.1-8b", help="synthetic model whose KV layout to use (default llama-3.1-8b)")
    p.add_argument("--source-device", default="cuda:0")
    p.add_argument("--dest-device", default="cuda:1")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--block-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[4, 16, 64])
    p.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 8192, 32768])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if min(args.block_sizes) < 1 or min(args.tokens) < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("block sizes, tokens and repeats must be >= 1, warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    card = f"{device_name(args.source_device)} -> {device_name(args.dest_device)}"
    print(f"kv transfer, {args.model} layout, {args.dtype}: {args.source_device} -> {args.dest_device} ({card})", flush=True)
    rows: list[dict] = []
    total, done = len(args.block_sizes) * (len(args.tokens) + 1), [0]

    def progress(row: dict) -> None:
        done[0] += 1
        print(f"  [{done[0]}/{total}] block {row['block_size']} {row['pattern']} {row['tokens']} tokens: "
              f"{row['gb_per_s_median']:.1f} GB/s", file=sys.stderr, flush=True)

    for block_size in args.block_sizes:
        rows += measure_block_size(args, block_size, progress)
    print(format_rows(rows))
    if args.out is not None:
        args.out.write_text(json.dumps({"card": card, "model": args.model, "dtype": args.dtype, "rows": rows}, indent=1))
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
