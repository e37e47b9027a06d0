"""Runs one scheduled batch through the model: builds the flat inputs, calls forward, returns logits.

The runner decides nothing: which tokens to compute comes from the scheduler, what to do with the
logits from the engine. A sequence needs logits when this step computes up to its last token and it
is a generating sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixquant_serve.engine.scheduler import ScheduledBatch
from mixquant_serve.engine.sequence import Sequence
from mixquant_serve.model.attention import AttentionMetadata
from mixquant_serve.model.llama import LlamaForCausalLM
from mixquant_serve.quant.precision import Precision


@dataclass
class StepOutput:
    sampled_seqs: list[Sequence]  # sequences whose logits were computed, in row order
    logits: torch.Tensor | None  # [len(sampled_seqs), vocab] fp32


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: torch.Tensor, block_size: int, precision: Precision):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.precision = precision
        self.device = kv_cache.device

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepOutput:
        seqs = [s for s, n in zip(batch.seqs, batch.num_new_tokens) if n > 0]
        counts = [n for n in batch.num_new_tokens if n > 0]
        if not seqs:
            return StepOutput([], None)
        input_ids: list[int] = []
        positions: list[int] = []
        slot_blocks: list[int] = []
        slot_offsets: list[int] = []
        context_lens: list[int] = []
        for seq, count in zip(seqs, counts):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + count
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slot_blocks.extend(seq.block_table[p // self.block_size] for p in range(start, end))
            slot_offsets.extend(p % self.block_size for p in range(start, end))
            context_lens.append(end)
        meta = AttentionMetadata(
            query_lens=counts,
            context_lens=context_lens,
            block_tables=[s.block_table for s in seqs],
            slot_blocks=self._tensor(slot_blocks),
            slot_offsets=self._tensor(slot_offsets),
            block_size=self.block_size,
        )
        hidden = self.model(self._tensor(input_ids), self._tensor(positions), self.kv_cache, meta, self.precision)
        # hidden: [tokens, hidden]; the last new token of each sequence that reaches its end is sampled
        rows, sampled = [], []
        offset = 0
        for seq, count in zip(seqs, counts):
            offset += count
            if not seq.is_prefill_only and seq.num_computed_tokens + count == len(seq):
                rows.append(offset - 1)
                sampled.append(seq)
        if not rows:
            return StepOutput([], None)
        return StepOutput(sampled, self.model.compute_logits(hidden[self._tensor(rows)]))

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
