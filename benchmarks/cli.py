"""`mixquant bench prefill|decode|baseline [options]`: runs a GPU benchmark's main with its own options.

Nothing heavy is imported until a benchmark runs (the benchmarks import triton and need CUDA), so
the `mixquant` command line stays importable on CPU-only hosts.
"""

from __future__ import annotations

import argparse
import sys

BENCHMARKS = ("prefill", "decode", "baseline")


def add_bench_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "bench",
        help="GPU speed benchmarks (synthetic Llama-3.1-8B): prefill precisions, decode vs the HBM roofline, "
             "our engine vs transformers",
    )
    p.add_argument("benchmark", choices=BENCHMARKS, help="which benchmark")
    p.add_argument("options", nargs=argparse.REMAINDER,
                   help="the benchmark's own options (python -m benchmarks.<name> --help lists them)")
    p.set_defaults(handler=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    if args.benchmark == "prefill":
        from benchmarks import prefill

        # benchmarks.prefill.main() takes no argv: it parses sys.argv
        sys.argv = ["mixquant bench prefill", *args.options]
        prefill.main()
    elif args.benchmark == "decode":
        from benchmarks import decode

        decode.main(args.options)
    else:
        from benchmarks import baseline

        baseline.main(args.options)
    return 0
