"""`mixquant eval quality` (run the configurations on the suite) and `mixquant eval suite` (write the suite).

`add_eval_parser(commands)` plugs both into the `mixquant` command; `python -m mixquant_serve.eval.cli`
runs them on their own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mixquant_serve.eval.configs import CONFIG_NAMES, configs_by_name
from mixquant_serve.eval.runner import DEFAULT_MAX_NEW_TOKENS, RunSettings
from mixquant_serve.eval.suite_gen import DEFAULT_SEED
from mixquant_serve.model.checkpoint import BUNDLED_NAME

BUNDLED_MODEL = f"bundled:{BUNDLED_NAME}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mixquant-eval", description=__doc__)
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def add_eval_parser(commands: argparse._SubParsersAction) -> None:
    evaluation = commands.add_parser("eval", help="answer-quality evaluation of quantized prefill and decode")
    subcommands = evaluation.add_subparsers(dest="eval_command", required=True)

    quality = subcommands.add_parser(
        "quality",
        help="run bf16, mixquant-nvfp4, all-nvfp4, mixquant-fp8, all-fp8 on the agentic suite; print tables, write JSON",
    )
    quality.add_argument("--model", default=BUNDLED_MODEL, help=f"model source (default {BUNDLED_MODEL})")
    source = quality.add_mutually_exclusive_group()
    source.add_argument("--seed", type=int, default=None, help=f"generate the suite from this seed (default {DEFAULT_SEED}: "
                        "the committed benchmarks/quality/suite.jsonl)")
    source.add_argument("--suite", type=Path, default=None, help="read the suite from this JSON-lines file instead")
    quality.add_argument("--limit", type=int, default=None, help="evaluate only the first N items (smoke runs)")
    quality.add_argument("--configs", nargs="+", choices=CONFIG_NAMES, default=list(CONFIG_NAMES),
                         help="configurations to run (default: all five); the bf16 reference always runs")
    quality.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    quality.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                         help=f"cap on an answer's tokens (default {DEFAULT_MAX_NEW_TOKENS})")
    quality.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    quality.add_argument("--no-progress", action="store_true", help="no progress bar")
    quality.set_defaults(handler=run_eval_quality)

    suite = subcommands.add_parser("suite", help="write the generated suite as JSON lines")
    suite.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"suite seed (default {DEFAULT_SEED})")
    suite.add_argument("--out", type=Path, required=True, help="file to write (e.g. benchmarks/quality/suite.jsonl)")
    suite.add_argument("--model", default=BUNDLED_MODEL, help="model whose tokenizer sizes the tool results")
    suite.set_defaults(handler=run_eval_suite)


def run_eval_quality(args: argparse.Namespace) -> int:
    import torch

    from mixquant_serve.engine.build import default_device
    from mixquant_serve.eval.quality import run_quality_eval
    from mixquant_serve.eval.report import write_results
    from mixquant_serve.eval.suite import read_suite
    from mixquant_serve.eval.suite_gen import generate_suite
    from mixquant_serve.model.loader import load_model
    from mixquant_serve.quant.precision import default_compute_dtype

    try:
        configs = configs_by_name(args.configs)
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
    except ValueError as error:
        print(f"mixquant eval quality: {error}", file=sys.stderr)
        return 2
    device = torch.device(args.device) if args.device else default_device()
    precisions = {"bf16", *(c.prefill_precision for c in configs), *(c.decode_precision for c in configs)}
    loaded = load_model(args.model, device, default_compute_dtype(device), precisions)
    if loaded.tokenizer is None:
        print("mixquant eval quality: this model has no tokenizer (synthetic weights)", file=sys.stderr)
        return 2
    if args.suite is not None:
        suite, seed, source = read_suite(args.suite), None, str(args.suite)
    else:
        seed = DEFAULT_SEED if args.seed is None else args.seed
        suite, source = generate_suite(loaded.tokenizer, seed), f"generated from seed {seed}"
    run = run_quality_eval(
        loaded,
        suite,
        configs,
        suite_source=source,
        seed=seed,
        limit=args.limit,
        settings=RunSettings(max_new_tokens=args.max_new_tokens),
        progress=not args.no_progress,
    )
    print(run.tables)
    if args.out is not None:
        write_results(run.document, args.out)
        print(f"[mixquant eval] wrote {args.out} ({run.document['run']['wall_seconds']:.0f} s wall)", file=sys.stderr)
    return 0


def run_eval_suite(args: argparse.Namespace) -> int:
    from mixquant_serve.eval.suite import suite_sha256, write_suite
    from mixquant_serve.eval.suite_gen import generate_suite
    from mixquant_serve.model.checkpoint import open_checkpoint
    from mixquant_serve.model.tokenizer import Tokenizer

    checkpoint = open_checkpoint(args.model)
    if checkpoint.tokenizer_dir is None:
        print("mixquant eval suite: this model has no tokenizer (synthetic weights)", file=sys.stderr)
        return 2
    groups = generate_suite(Tokenizer(checkpoint.tokenizer_dir), args.seed)
    write_suite(groups, args.out)
    items = sum(len(group.items) for group in groups)
    print(f"wrote {args.out}: {len(groups)} groups, {items} items, sha256 {suite_sha256(groups)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
