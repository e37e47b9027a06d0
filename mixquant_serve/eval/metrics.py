"""What is measured per item, and how items add up per configuration and per task family.

Per item and configuration (reference = the bf16 configuration's greedy answer R and its distributions):
  correct           exact-match score of the configuration's own greedy answer (scoring.py)
  agrees            its greedy answer equals R token for token
  matched_prefix    leading tokens equal to R
  kl                KL(reference || configuration) of the next-token distributions at each position of R,
                    teacher-forced on R (both read prompt + R[:j]); full vocabulary, fp32
  first_token_kl    kl at the first position: the last prompt token, where on Mix-Quant only the
                    quantized prefill's KV differs from the reference

Aggregates: accuracy, agreement and mean matched prefix are means over items; kl mean and p95 are
over all positions of all items (token weighted); first-token KL mean and p95 are over items.

Loss, per Mix-Quant / all-quantized pair of one format (nvfp4, fp8):
  accuracy loss  = reference accuracy - configuration accuracy
  loss fraction  = loss(mix-quant) / loss(all-quantized): the share of full quantization's loss that
                   Mix-Quant still has (0 = keeps everything, 1 = loses as much); undefined when the
                   all-quantized loss is not positive. The same ratio is reported for mean KL,
                   first-token KL and disagreement (1 - agreement).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mixquant_serve.eval.configs import MIXQUANT_PAIRS
from mixquant_serve.eval.suite import FAMILIES


@dataclass
class ConfigOutcome:
    token_ids: list[int]
    text: str
    correct: bool
    agrees: bool
    matched_prefix: int
    kl: list[float]  # one per reference position

    @property
    def first_token_kl(self) -> float:
        return self.kl[0]


@dataclass
class ItemOutcome:
    item_id: str
    group_id: str
    family: str
    skill: str
    prompt_tokens: int
    reference_token_ids: list[int]
    reference_text: str
    reference_correct: bool
    configs: dict[str, ConfigOutcome] = field(default_factory=dict)


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(reference) || softmax(logits)) per row, in fp32, clamped at 0 (rounding can dip below).

    reference_logits, logits: [positions, vocab] -> [positions]
    """
    if reference_logits.shape != logits.shape:
        raise ValueError(f"logits must have the reference's shape {tuple(reference_logits.shape)}, got {tuple(logits.shape)}")
    reference = torch.log_softmax(reference_logits.float(), dim=-1)
    other = torch.log_softmax(logits.float(), dim=-1)
    return (reference.exp() * (reference - other)).sum(dim=-1).clamp_min(0.0)


def summarize(outcomes: list[ItemOutcome], config: str) -> dict[str, float | int]:
    """The aggregate metrics of one configuration over `outcomes` (see the module docstring)."""
    if not outcomes:
        raise ValueError("outcomes must be non-empty")
    results = [outcome.configs[config] for outcome in outcomes]
    kl = np.array([value for result in results for value in result.kl], dtype=np.float64)
    first = np.array([result.first_token_kl for result in results], dtype=np.float64)
    reference_correct = np.array([outcome.reference_correct for outcome in outcomes])
    correct = np.array([result.correct for result in results])
    return {
        "items": len(results),
        "accuracy": float(correct.mean()),
        "reference_accuracy": float(reference_correct.mean()),
        "agreement": float(np.mean([result.agrees for result in results])),
        "mean_matched_prefix": float(np.mean([result.matched_prefix for result in results])),
        "mean_reference_tokens": float(np.mean([len(outcome.reference_token_ids) for outcome in outcomes])),
        "kl_mean": float(kl.mean()),
        "kl_p95": float(np.percentile(kl, 95)),
        "first_token_kl_mean": float(first.mean()),
        "first_token_kl_p95": float(np.percentile(first, 95)),
        "right_to_wrong": int((reference_correct & ~correct).sum()),
        "wrong_to_right": int((~reference_correct & correct).sum()),
    }


def summarize_all(outcomes: list[ItemOutcome], configs: list[str]) -> dict[str, dict[str, dict[str, float | int]]]:
    """{config: {"all": metrics, <family>: metrics, ...}} for the families present in outcomes."""
    families = [family for family in FAMILIES if any(outcome.family == family for outcome in outcomes)]
    summary = {}
    for config in configs:
        summary[config] = {"all": summarize(outcomes, config)}
        for family in families:
            summary[config][family] = summarize([o for o in outcomes if o.family == family], config)
    return summary


def loss_fractions(summary: dict[str, dict[str, dict[str, float | int]]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """{"mixquant-nvfp4 / all-nvfp4": {scope: {...}}} for each pair whose two configurations were run."""
    fractions: dict[str, dict[str, dict[str, float | None]]] = {}
    for mix, full in MIXQUANT_PAIRS:
        if mix not in summary or full not in summary:
            continue
        per_scope = {}
        for scope, mix_metrics in summary[mix].items():
            full_metrics = summary[full][scope]
            mix_loss = mix_metrics["reference_accuracy"] - mix_metrics["accuracy"]
            full_loss = full_metrics["reference_accuracy"] - full_metrics["accuracy"]
            per_scope[scope] = {
                "accuracy_loss_mixquant": mix_loss,
                "accuracy_loss_all_quantized": full_loss,
                "accuracy_loss_fraction": _ratio(mix_loss, full_loss),
                "kl_mean_fraction": _ratio(mix_metrics["kl_mean"], full_metrics["kl_mean"]),
                "first_token_kl_mean_fraction": _ratio(
                    mix_metrics["first_token_kl_mean"], full_metrics["first_token_kl_mean"]
                ),
                "disagreement_fraction": _ratio(1.0 - mix_metrics["agreement"], 1.0 - full_metrics["agreement"]),
            }
        fractions[f"{mix} / {full}"] = per_scope
    return fractions


def _ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, None when the denominator is not positive (no loss to take a share of)."""
    return float(numerator / denominator) if denominator > 0 else None
