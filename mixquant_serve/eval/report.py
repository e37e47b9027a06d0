"""The evaluation's outputs: printed tables and the results JSON (numbers, per-item answers, environment)."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from mixquant_serve.eval.configs import EvalConfig
from mixquant_serve.eval.metrics import ItemOutcome

RESULTS_FORMAT = 1
_COLUMNS = (
    ("accuracy", "acc", "{:.3f}"),
    ("agreement", "agree", "{:.3f}"),
    ("mean_matched_prefix", "prefix", "{:.2f}"),
    ("kl_mean", "KL mean", "{:.2e}"),
    ("kl_p95", "KL p95", "{:.2e}"),
    ("first_token_kl_mean", "1st KL mean", "{:.2e}"),
    ("first_token_kl_p95", "1st KL p95", "{:.2e}"),
    ("right_to_wrong", "lost", "{:d}"),
    ("wrong_to_right", "gained", "{:d}"),
)


def compute_note(device: torch.device) -> str:
    if device.type == "cpu":
        return 'on CPU "bf16" is the unquantized reference computed in fp32 (the CPU has no fast bf16)'
    return f'"bf16" is the unquantized reference computed in bf16 on {device.type}'


def format_tables(summary: dict[str, dict[str, dict[str, Any]]], fractions: dict[str, Any], note: str) -> str:
    """Text tables: one per scope (all items, then each family), a row per configuration; then loss fractions."""
    lines = [f"Note: {note}.", ""]
    scopes = list(next(iter(summary.values())))
    for scope in scopes:
        any_config = next(iter(summary.values()))[scope]
        title = "all items" if scope == "all" else f"family {scope}"
        lines.append(f"{title}: {any_config['items']} items, reference accuracy {any_config['reference_accuracy']:.3f}")
        header = f"{'config':<16}" + "".join(f"{label:>12}" for _, label, _ in _COLUMNS)
        lines += [header, "-" * len(header)]
        for name, scopes_of_config in summary.items():
            metrics = scopes_of_config[scope]
            lines.append(f"{name:<16}" + "".join(f"{fmt.format(metrics[key]):>12}" for key, _, fmt in _COLUMNS))
        lines.append("")
    lines.append("Mix-Quant's loss as a fraction of full quantization's loss (0 = no loss, 1 = the same loss):")
    for pair, per_scope in fractions.items():
        lines.append(f"  {pair}")
        for scope, values in per_scope.items():
            lines.append(
                f"    {scope:<11} accuracy loss {values['accuracy_loss_mixquant']:+.3f} vs "
                f"{values['accuracy_loss_all_quantized']:+.3f} -> {_fraction(values['accuracy_loss_fraction'])}; "
                f"KL {_fraction(values['kl_mean_fraction'])}; first-token KL "
                f"{_fraction(values['first_token_kl_mean_fraction'])}; disagreement "
                f"{_fraction(values['disagreement_fraction'])}"
            )
    if not fractions:
        lines.append("  (needs a mixquant-* configuration and its all-* counterpart)")
    return "\n".join(lines)


def results_document(
    *,
    model_name: str,
    device: torch.device,
    suite: dict[str, Any],
    configs: list[EvalConfig],
    settings: dict[str, Any],
    summary: dict[str, Any],
    fractions: dict[str, Any],
    outcomes: list[ItemOutcome],
    run: dict[str, Any],
) -> dict[str, Any]:
    """Everything a results file holds. Only `run` (timings) differs between reruns with the same inputs."""
    return {
        "format": RESULTS_FORMAT,
        "note": compute_note(device),
        "model": model_name,
        "suite": suite,
        "configs": [
            {"name": c.name, "prefill_precision": c.prefill_precision, "decode_precision": c.decode_precision}
            for c in configs
        ],
        "settings": settings,
        "summary": summary,
        "loss_fractions": fractions,
        "items": [_item_record(outcome) for outcome in outcomes],
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
        "run": run,
    }


def write_results(document: dict[str, Any], path: Path) -> None:
    Path(path).write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _item_record(outcome: ItemOutcome) -> dict[str, Any]:
    return {
        "item_id": outcome.item_id,
        "family": outcome.family,
        "skill": outcome.skill,
        "prompt_tokens": outcome.prompt_tokens,
        "reference": {
            "text": outcome.reference_text,
            "tokens": len(outcome.reference_token_ids),
            "correct": outcome.reference_correct,
        },
        "configs": {
            name: {
                "text": result.text,
                "correct": result.correct,
                "agrees": result.agrees,
                "matched_prefix": result.matched_prefix,
                "kl_mean": sum(result.kl) / len(result.kl),
                "first_token_kl": result.first_token_kl,
            }
            for name, result in outcome.configs.items()
        },
    }


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
