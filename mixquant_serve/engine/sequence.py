"""A request's token sequence and its place in the paged KV cache."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from mixquant_serve.engine.sampling import SamplerState, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Tokens of one request; `num_computed_tokens` of them have their k/v in the cache.

    A prefill-only sequence (prefill engine) stops once its tokens are computed and never samples;
    a generating sequence (decode engine) samples a token each time its computed tokens reach its end.
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    sampling: SamplingParams | None  # None: prefill only
    sampler_state: SamplerState = field(default_factory=SamplerState)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    block_hashes: list[int] = field(default_factory=list)  # chain hashes of the leading computed full blocks
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def is_prefill_only(self) -> bool:
        return self.sampling is None

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
