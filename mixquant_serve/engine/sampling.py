"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """What to generate. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class SamplerState:
    """Per-sequence random state: a seeded generator makes a request reproducible whatever its batch."""

    generator: torch.Generator | None = field(default=None)


def make_sampler_state(params: SamplingParams, device: torch.device) -> SamplerState:
    if params.greedy:
        return SamplerState()
    generator = torch.Generator(device=device)
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()
    return SamplerState(generator)


def sample(logits: torch.Tensor, params: list[SamplingParams], states: list[SamplerState]) -> list[int]:
    """logits: [sequences, vocab] fp32 -> one token id per sequence."""
    greedy_ids = logits.argmax(dim=-1).tolist()
    tokens: list[int] = []
    for row, (p, state) in enumerate(zip(params, states)):
        if p.greedy:
            tokens.append(greedy_ids[row])
            continue
        # max subtracted first and temperature held within the dtype's range: a tiny temperature leaves the top
        # logit at 0 and sends the rest to -inf (greedy in effect) instead of producing 0/0 = nan
        temperature = max(p.temperature, torch.finfo(logits.dtype).tiny)
        probs = _filtered_probs((logits[row] - logits[row].max()) / temperature, p.top_k, p.top_p)
        tokens.append(int(torch.multinomial(probs, 1, generator=state.generator).item()))
    return tokens


def _filtered_probs(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    # scaled: [vocab] logits already divided by temperature
    if top_k > 0 and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest set whose mass reaches top_p: a token is dropped if the mass before it already does
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        dropped = mass_before >= top_p
        dropped[0] = False  # the top token always stays (a top_p below fp32's range would drop every token)
        sorted_probs = sorted_probs.masked_fill(dropped, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum()
    return probs
