"""`mixquant load`: multi-turn agent sessions against an OpenAI-compatible endpoint."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from mixquant_serve.loadgen.client import TurnResult
from mixquant_serve.loadgen.report import format_summary, plot_png, summarize, write_json
from mixquant_serve.loadgen.runner import LoadConfig, run_load


def add_load_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("load", help="drive an OpenAI-compatible endpoint with multi-turn agent sessions")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default http://127.0.0.1:8000)")
    p.add_argument("--model", default=None, help="model name (default: the first of GET /v1/models)")
    p.add_argument("--concurrency", type=int, default=4, help="agent sessions in flight (default 4)")
    p.add_argument("--turns", type=int, default=4, help="turns per session (default 4)")
    p.add_argument("--think-time", type=float, default=0.5, help="seconds between a reply and the next turn (default 0.5)")
    p.add_argument("--tool-result-tokens", type=int, default=400, help="approximate tokens of each tool result (default 400)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each turn (default 32)")
    p.add_argument("--duration", type=float, default=None, help="seconds to run (default 120 unless --requests is given)")
    p.add_argument("--requests", type=int, default=None, help="turns to send at most")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout in seconds (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer <key>'")
    p.add_argument("--prompt-mode", choices=("chat", "tokens"), default="chat",
                   help="chat: text sessions over /v1/chat/completions (default); tokens: token-id sessions over "
                        "/v1/completions, for models without a tokenizer (synthetic:)")
    p.add_argument("--vocab-limit", type=int, default=32000,
                   help="tokens mode: draw prompt ids below this (default 32000; must be within the vocabulary)")
    p.add_argument("--ttft-target", type=float, default=None, help="goodput: TTFT target in seconds (with --itl-target)")
    p.add_argument("--itl-target", type=float, default=None,
                   help="goodput: target of a request's mean inter-token latency, in seconds (with --ttft-target)")
    p.add_argument("--json", type=Path, default=None, help="write the summary and every turn here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of latency over time here (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_load_command)


def run_load_command(args: argparse.Namespace) -> int:
    duration = args.duration if args.duration is not None else (None if args.requests is not None else 120.0)
    try:
        config = LoadConfig(
            base_url=args.url,
            model=args.model,
            concurrency=args.concurrency,
            turns=args.turns,
            think_time_s=args.think_time,
            tool_result_tokens=args.tool_result_tokens,
            max_tokens=args.max_tokens,
            duration_s=duration,
            max_requests=args.requests,
            request_timeout_s=args.timeout,
            seed=args.seed,
            api_key=args.api_key,
            prompt_mode=args.prompt_mode,
            vocab_limit=args.vocab_limit,
        )
        if (args.ttft_target is None) != (args.itl_target is None):
            raise ValueError("--ttft-target and --itl-target go together (goodput needs both)")
    except ValueError as error:
        print(f"mixquant load: {error}", file=sys.stderr)
        return 2
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=args.requests, unit="req", desc="load", dynamic_ncols=True)

    def on_turn(result: TurnResult) -> None:
        if progress is not None:
            progress.update(1)
            if not result.ok:
                progress.set_postfix_str(f"last error: {result.error}"[:60])

    try:
        run = asyncio.run(run_load(config, on_turn))
    finally:
        if progress is not None:
            progress.close()
    summary = summarize(run, args.ttft_target, args.itl_target)
    print(format_summary(summary))
    if args.json is not None:
        write_json(run, summary, args.json)
        print(f"wrote {args.json}")
    if args.plot is not None:
        try:
            plot_png(run, args.plot)
        except ValueError as error:
            print(f"mixquant load: {error}", file=sys.stderr)
            return 2
        print(f"wrote {args.plot}")
    return 0 if summary["ok"] else 1
