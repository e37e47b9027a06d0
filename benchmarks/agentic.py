"""Agentic serving on two GPUs: disaggregated Mix-Quant vs the same with BF16 prefill vs co-located BF16.

    disagg-fp8      prefill replica (fp8, GPU 0) + decode replica (bf16, GPU 1), KV over NIXL
    disagg-bf16     the same with bf16 prefill
    colocated-bf16  two bf16 replicas (GPU 0, GPU 1), each prefilling and decoding its own sessions
                    (prefill.enabled: false), sessions pinned to a replica by the same session router

Each setup deploys the app (Ray Serve, the real replicas), warms it up (kernels compile, CUDA graphs
are captured), then runs `mixquant load` in token mode (synthetic weights have no tokenizer) at each
load level: `concurrency` agent sessions in flight, each `turns` turns that add `tool_result_tokens`
tokens of tool output to the history (contexts grow 8K -> 32K with the defaults), `max_tokens`
output tokens per turn, the same seeded sessions for every setup. It reports TTFT and ITL
percentiles, goodput (requests/s meeting the TTFT and mean-ITL targets), throughput and the KV pulls
(GB/s per request) and writes one JSON per setup; `report` merges them into one table and file.

    python -m benchmarks.agentic run --setup disagg-fp8 --out agentic-disagg-fp8.json
    python -m benchmarks.agentic report agentic-*.json --out agentic.json

One setup takes ~4-5 minutes on H100s with the defaults (start, warm-up, 2 x 75 s of load).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

SETUPS = ("disagg-fp8", "disagg-bf16", "colocated-bf16")
APP_NAME = "agentic"


def app_args(setup: str, args: argparse.Namespace) -> dict[str, Any]:
    """The AppConfig of one setup: one GPU per replica, fixed replica counts (no autoscaling during a run)."""
    gpus = args.replica_gpus if args.device == "cuda" else 0.0
    fixed = {"min_replicas": 1, "max_replicas": 1}
    decode_engine = {"block_size": args.block_size, "num_kv_blocks": args.decode_kv_blocks, "max_num_seqs": 64,
                     "max_num_batched_tokens": args.decode_batched_tokens}
    config: dict[str, Any] = {
        "model": args.model,
        "device": args.device,
        "decode": {
            "precision": "bf16",
            "local_prefill_tokens": args.local_prefill_tokens,
            "resources": {"num_cpus": args.replica_cpus, "num_gpus": gpus},
            "autoscaling": fixed,
            "engine": decode_engine,
            "max_ongoing_requests": 256,
        },
        "router": {"num_cpus": args.replica_cpus, "max_tokens_cap": 8192},
    }
    if args.model_cache_dir:
        config["model_cache_dir"] = args.model_cache_dir
    if setup == "colocated-bf16":
        config["prefill"] = {"enabled": False}
        config["decode"]["autoscaling"] = {"min_replicas": 2, "max_replicas": 2}
    else:
        config["prefill"] = {
            "precision": args.quantized if setup == "disagg-fp8" else "bf16",
            "resources": {"num_cpus": args.replica_cpus, "num_gpus": gpus},
            "autoscaling": fixed,
            "engine": {"block_size": args.block_size, "num_kv_blocks": args.prefill_kv_blocks, "max_num_seqs": 16,
                       "max_num_batched_tokens": args.prefill_batched_tokens, "kv_lease_seconds": 30},
            "max_ongoing_requests": 256,
        }
    return config


def cards() -> list[str]:
    import torch

    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else ["cpu"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def load_config(args: argparse.Namespace, base_url: str, concurrency: int, seed: int, duration_s: float | None,
                max_requests: int | None = None):
    from mixquant_serve.loadgen.runner import LoadConfig

    return LoadConfig(
        base_url=base_url,
        concurrency=concurrency,
        turns=args.turns,
        think_time_s=args.think_time,
        tool_result_tokens=args.tool_result_tokens,
        max_tokens=args.max_tokens,
        duration_s=duration_s,
        max_requests=max_requests,
        request_timeout_s=args.request_timeout,
        drain_timeout_s=args.request_timeout,
        seed=seed,
        prompt_mode="tokens",
        vocab_limit=args.vocab_limit,
    )


def run_setup(setup: str, args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from mixquant_serve.app import build_app
    from mixquant_serve.loadgen.report import format_summary, summarize
    from mixquant_serve.loadgen.runner import run_load

    config = app_args(setup, args)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    ray.init(include_dashboard=False, log_to_driver=args.ray_logs, num_gpus=args.cluster_gpus)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        started = time.perf_counter()
        print(f"[{setup}] deploying ({args.model}, {args.device}) ...", file=sys.stderr, flush=True)
        deploy(build_app(config), args.deploy_timeout)
        ready_s = time.perf_counter() - started
        print(f"[{setup}] ready in {ready_s:.1f} s; warming up", file=sys.stderr, flush=True)
        warm = asyncio.run(run_load(load_config(args, base_url, 2, seed=10_000, duration_s=None,
                                                max_requests=2 * args.turns)))
        warm_summary = summarize(warm)
        if warm_summary["errors"]:
            raise RuntimeError(f"[{setup}] warm-up failed: {warm_summary['errors_by_kind']}")
        levels = []
        for index, concurrency in enumerate(args.concurrency):
            print(f"[{setup}] load: concurrency {concurrency} for {args.duration:.0f} s", file=sys.stderr, flush=True)
            run = asyncio.run(run_load(load_config(args, base_url, concurrency, seed=index, duration_s=args.duration)))
            summary = summarize(run, args.ttft_target, args.itl_target)
            print(f"[{setup}] concurrency {concurrency}:\n{format_summary(summary)}", flush=True)
            levels.append({"concurrency": concurrency, "summary": summary})
        serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    return {
        "setup": setup,
        "cards": cards(),
        "app_args": config,
        "load": {k: getattr(args, k) for k in ("turns", "think_time", "tool_result_tokens", "max_tokens", "duration",
                                                "ttft_target", "itl_target", "vocab_limit")},
        "ready_s": ready_s,
        "warmup": warm_summary,
        "levels": levels,
        "date": time.strftime("%Y-%m-%d"),
    }


def deploy(app: Any, timeout_s: float) -> None:
    """Deploys the app and waits until it runs; a failed deploy or one still pending after `timeout_s`
    (replicas that cannot be placed wait forever otherwise) raises with Serve's status message."""
    from ray import serve

    from mixquant_serve.app import wait_until_running

    serve.run_many([serve.RunTarget(app, name=APP_NAME, route_prefix="/")], wait_for_applications_running=False)
    wait_until_running(APP_NAME, timeout_s)


def format_table(results: list[dict[str, Any]]) -> str:
    first = results[0]["load"]
    lines = [
        f"cards: {', '.join(sorted(set(c for r in results for c in r['cards'])))}; goodput targets: TTFT <= "
        f"{first['ttft_target'] * 1e3:.0f} ms, mean ITL <= {first['itl_target'] * 1e3:.0f} ms",
        f"{'setup':<16} {'conc':>4} {'ok':>5} {'err':>4} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} "
        f"{'req/s':>6} {'goodput':>8} {'KV GB/s':>8}",
    ]
    for result in results:
        for level in result["levels"]:
            s = level["summary"]
            kv = s["kv_transfer"]["gb_per_s"]["p50"] if s.get("kv_transfer") else None
            lines.append(
                f"{result['setup']:<16} {level['concurrency']:>4} {s['ok']:>5} {s['errors']:>4} "
                f"{_ms(s['ttft_s']['p50'])} {_ms(s['ttft_s']['p99'])} {_ms(s['itl_s']['p50'], 8)} {_ms(s['itl_s']['p99'], 8)} "
                f"{s['requests_per_s']:>6.2f} {s['goodput']['requests_per_s']:>8.2f} {'-' if kv is None else f'{kv:.1f}':>8}"
            )
    return "\n".join(lines)


def _ms(seconds: float | None, width: int = 9) -> str:
    return f"{'-':>{width}}" if seconds is None else f"{seconds * 1e3:>{width}.0f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.agentic", description=__doc__.split("\n\n")[0])
    commands = p.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="deploy one setup and run the load levels")
    run.add_argument("--setup", choices=SETUPS, required=True)
    run.add_argument("--model", default="synthetic:llama-3.1-8b")
    run.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    run.add_argument("--model-cache-dir", default=None)
    run.add_argument("--quantized", default="fp8", choices=("fp8", "nvfp4", "auto"), help="disagg-fp8's prefill precision")
    run.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[2, 6],
                     help="load levels: sessions in flight (default 2,6)")
    run.add_argument("--turns", type=int, default=4)
    run.add_argument("--tool-result-tokens", type=int, default=8000)
    run.add_argument("--max-tokens", type=int, default=64)
    run.add_argument("--think-time", type=float, default=1.0)
    run.add_argument("--duration", type=float, default=75.0, help="seconds of load per level (default 75)")
    run.add_argument("--request-timeout", type=float, default=120.0)
    run.add_argument("--ttft-target", type=float, default=2.0, help="goodput TTFT target, seconds (default 2.0)")
    run.add_argument("--itl-target", type=float, default=0.030, help="goodput mean-ITL target, seconds (default 0.030)")
    run.add_argument("--vocab-limit", type=int, default=128000)
    run.add_argument("--block-size", type=int, default=16)
    run.add_argument("--prefill-kv-blocks", type=int, default=16384)
    run.add_argument("--decode-kv-blocks", type=int, default=24576)
    run.add_argument("--prefill-batched-tokens", type=int, default=16384)
    run.add_argument("--decode-batched-tokens", type=int, default=8192)
    run.add_argument("--local-prefill-tokens", type=int, default=512,
                     help="disaggregated setups: uncached tokens up to which decode prefills locally (default 512)")
    run.add_argument("--replica-gpus", type=float, default=1.0,
                     help="GPUs reserved by each replica (0.5: a prefill and a decode replica share one GPU)")
    run.add_argument("--cluster-gpus", type=int, default=None, help="GPUs Ray may use (default: all it detects)")
    run.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs reserved by each replica and the router")
    run.add_argument("--deploy-timeout", type=float, default=420.0, help="seconds to wait for the app to run")
    run.add_argument("--ray-logs", action="store_true", help="show the replicas' logs")
    run.add_argument("--out", type=Path, required=True)
    report = commands.add_parser("report", help="merge per-setup JSON files into one table and file")
    report.add_argument("inputs", nargs="+", type=Path)
    report.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "run":
        result = run_setup(args.setup, args)
        args.out.write_text(json.dumps(result, indent=1))
        print(format_table([result]))
        print(f"wrote {args.out}")
        return 0 if all(level["summary"]["ok"] for level in result["levels"]) else 1
    results = [json.loads(path.read_text()) for path in args.inputs]
    results.sort(key=lambda r: SETUPS.index(r["setup"]))
    print(format_table(results))
    if args.out is not None:
        args.out.write_text(json.dumps({"setups": results}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
