"""Runs one scheduled batch through the model: builds the flat inputs, calls forward, returns logits.

The runner decides nothing: which tokens to compute comes from the scheduler, what to do with the
logits from the engine. A sequence needs logits when this step computes up to its last token and it
is a generating sequence.

On CUDA a decode step (one new token per sequence) carries DecodeTensors, so attention runs the
Triton paged-attention kernel; after `capture_decode_graphs`, a decode step in which every sequence
samples replays a captured CUDA graph (mixquant_serve/engine/cuda_graphs.py) when its batch fits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixquant_serve.engine.cuda_graphs import DECODE_GRAPH_BATCH_SIZES, DecodeGraphs
from mixquant_serve.engine.scheduler import ScheduledBatch
from mixquant_serve.engine.sequence import Sequence
from mixquant_serve.model.attention import AttentionMetadata, DecodeTensors, decode_tensors
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
        self.decode_graphs: DecodeGraphs | None = None
        self._num_sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                         if self.device.type == "cuda" else 0)

    def capture_decode_graphs(self, batch_sizes: list[int] | tuple[int, ...] = DECODE_GRAPH_BATCH_SIZES) -> None:
        """Captures decode forwards for these batch sizes (CUDA only); later decode steps replay them."""
        self.decode_graphs = DecodeGraphs(self.model, self.kv_cache, self.block_size, self.precision, batch_sizes)

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
        block_tables = [s.block_table for s in seqs]
        is_decode = all(count == 1 for count in counts)
        if (is_decode and self.decode_graphs is not None
                and self.decode_graphs.padded_batch_size(len(seqs)) is not None
                and all(not s.is_prefill_only and s.num_computed_tokens + 1 == len(s) for s in seqs)):
            logits = self.decode_graphs.replay(input_ids, positions, slot_blocks, slot_offsets, block_tables,
                                               context_lens)
            return StepOutput(seqs, logits)
        meta = AttentionMetadata(
            query_lens=counts,
            context_lens=context_lens,
            block_tables=block_tables,
            slot_blocks=self._tensor(slot_blocks),
            slot_offsets=self._tensor(slot_offsets),
            block_size=self.block_size,
            decode=self._decode_tensors(block_tables, context_lens) if is_decode else None,
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

    def _decode_tensors(self, block_tables: list[list[int]], context_lens: list[int]) -> DecodeTensors | None:
        """The paged-attention kernel's inputs on CUDA; None on CPU (the torch path needs none)."""
        if self.device.type != "cuda":
            return None
        from kernels.paged_attention import decode_num_splits

        num_splits = decode_num_splits(len(context_lens), self.kv_cache.shape[4], max(context_lens), self._num_sms)
        return decode_tensors(block_tables, context_lens, num_splits, self.device)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
