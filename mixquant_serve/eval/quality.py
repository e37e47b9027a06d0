"""One quality evaluation from a loaded model and a suite to the results document and the printed tables."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from mixquant_serve.eval.configs import EvalConfig
from mixquant_serve.eval.metrics import loss_fractions, summarize_all
from mixquant_serve.eval.report import compute_note, format_tables, results_document
from mixquant_serve.eval.runner import RunSettings, RunTimings, evaluate
from mixquant_serve.eval.suite import EvalGroup, select_items, suite_sha256
from mixquant_serve.model.loader import LoadedModel


@dataclass
class QualityRun:
    document: dict[str, Any]  # what the results JSON holds
    tables: str  # what is printed


def run_quality_eval(
    loaded: LoadedModel,
    suite: list[EvalGroup],
    configs: list[EvalConfig],
    *,
    suite_source: str,
    seed: int | None,
    limit: int | None = None,
    settings: RunSettings = RunSettings(),
    progress: bool = True,
) -> QualityRun:
    """Evaluates the first `limit` items of `suite` (all if None) under every configuration."""
    groups = select_items(suite, limit)
    device = next(loaded.model.parameters()).device
    timings = RunTimings()
    wall_started, cpu_started = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        outcomes = evaluate(loaded, groups, configs, settings, progress=progress, timings=timings)
    wall_seconds, cpu_seconds = time.perf_counter() - wall_started, time.process_time() - cpu_started

    summary = summarize_all(outcomes, [c.name for c in configs])
    fractions = loss_fractions(summary)
    items = [item for group in groups for item in group.items]
    document = results_document(
        model_name=loaded.name,
        device=device,
        suite={
            "source": suite_source,
            "seed": seed,
            "sha256": suite_sha256(suite),
            "limit": limit,
            "groups": len(groups),
            "items": len(items),
            "families": dict(sorted(Counter(item.family for item in items).items())),
            "tool_result_tokens": [min(g.tool_result_tokens for g in groups), max(g.tool_result_tokens for g in groups)],
            "prompt_tokens": [min(o.prompt_tokens for o in outcomes), max(o.prompt_tokens for o in outcomes)],
        },
        configs=configs,
        settings={
            "max_new_tokens": settings.max_new_tokens,
            "prefill_chunk_tokens": settings.prefill_chunk_tokens,
            "block_size": settings.block_size,
            "decoding": "greedy; stops at end of turn, a newline or max_new_tokens; value answers also at the "
            "closing quote",
        },
        summary=summary,
        fractions=fractions,
        outcomes=outcomes,
        run={
            "wall_seconds": wall_seconds,
            "cpu_seconds": cpu_seconds,
            "model_load_seconds": loaded.load_seconds,
            "prefill_seconds": timings.prefill_seconds,
            "reference_seconds": timings.reference_seconds,
            "config_seconds": timings.config_seconds,
        },
    )
    return QualityRun(document, format_tables(summary, fractions, compute_note(device)))
