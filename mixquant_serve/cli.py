"""`mixquant` command line: generate (one process, both phases) and eval quality."""

from __future__ import annotations

import argparse
import sys

from mixquant_serve.engine.sampling import SamplingParams
from mixquant_serve.eval.cli import add_eval_parser
from mixquant_serve.loadgen.cli import add_load_parser
from benchmarks.cli import add_bench_parser

BUNDLED_MODEL = "bundled:smollm2-135m-instruct"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mixquant", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(commands)
    add_eval_parser(commands)
    add_load_parser(commands)
    add_bench_parser(commands)
    args = parser.parse_args(argv)
    return args.handler(args)


def add_generate_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "generate",
        help="prefill with the chosen precision, decode in BF16 (fp32 on CPU), print only the generated text",
    )
    p.add_argument("--model", default=BUNDLED_MODEL, help=f"model source (default {BUNDLED_MODEL}; a local HF folder; synthetic:NAME)")
    p.add_argument("--prompt", required=True, help="user message (rendered with the chat template unless --raw)")
    p.add_argument("--system", default=None, help="optional system message")
    p.add_argument("--raw", action="store_true", help="tokenize the prompt as plain text, without the chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prefill-precision", choices=["auto", "nvfp4", "fp8", "bf16"], default="auto")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--local-prefill-tokens",
        type=int,
        default=0,
        help="prefill up to this many uncached tokens in the decode engine instead of the prefill engine",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--verbose", action="store_true", help="report where the prefill ran on stderr")
    p.set_defaults(handler=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from mixquant_serve.engine.build import build_local_pipeline

    try:
        sampling = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=tuple(args.stop),
        )
    except ValueError as error:
        print(f"mixquant generate: {error}", file=sys.stderr)
        return 2
    device = torch.device(args.device) if args.device else None
    pipeline, loaded = build_local_pipeline(
        args.model, args.prefill_precision, device=device, local_prefill_tokens=args.local_prefill_tokens
    )
    if loaded.tokenizer is None:
        print("mixquant generate: this model has no tokenizer (synthetic weights)", file=sys.stderr)
        return 2
    if args.raw:
        prompt_ids = loaded.tokenizer.encode(args.prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        prompt_ids = loaded.tokenizer.apply_chat_template(messages)
    generation = pipeline.generate(prompt_ids, sampling)
    print(generation.text)
    if args.verbose:
        print(f"[mixquant] {generation.report} finish_reason={generation.finish_reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
