"""Decode steps replayed from CUDA graphs: one graph per captured batch size, the batch padded up.

A decode step of an 8B model issues ~20 kernels a layer; at batch 1 their launches cost as much
host time as the step's device time. A graph replays the whole forward (embedding, the blocks with
the fused KV store and the Triton paged-attention kernel, final norm, LM head) with one launch.

Everything a graph reads lives in static buffers written before each replay:

    token_inputs  [4, max_batch] int64: input ids, positions, slot blocks, slot offsets
    block_tables  [max_batch, num_kv_blocks] int32 (a table cannot be longer than the cache)
    context_lens  [max_batch] int32

A batch of n sequences replays the graph of the smallest captured size >= n; the padding rows have
slot block -1 (their k/v are not stored) and context 0 (attention returns zeros), and their logits
are dropped. Batches larger than the largest captured size run eagerly. The kernel's split count is
fixed per graph, chosen for the longest context the cache can hold, because a graph replays for
any context length. Graphs share one memory pool, captured largest first.
"""

from __future__ import annotations

import torch

from mixquant_serve.model.attention import AttentionMetadata, DecodeTensors, pack_block_tables
from mixquant_serve.model.llama import LlamaForCausalLM
from mixquant_serve.quant.precision import Precision

DECODE_GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
PADDING_SLOT_BLOCK = -1
WARMUP_RUNS = 2  # before capture: compiles the Triton kernels, sets up cuBLAS workspaces


def graph_batch_sizes(max_num_seqs: int, sizes: tuple[int, ...] = DECODE_GRAPH_BATCH_SIZES) -> list[int]:
    """The captured sizes an engine of max_num_seqs needs: those below it and the first at or above it."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    below = [s for s in sizes if s < max_num_seqs]
    above = [s for s in sizes if s >= max_num_seqs]
    return below + above[:1]


class DecodeGraphs:
    """Captured decode forwards (model + LM head) of one model, KV cache and precision."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: torch.Tensor,
        block_size: int,
        precision: Precision,
        batch_sizes: list[int] | tuple[int, ...] = DECODE_GRAPH_BATCH_SIZES,
    ):
        if kv_cache.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA kv_cache, got one on {kv_cache.device}")
        if not batch_sizes or any(b < 1 for b in batch_sizes):
            raise ValueError(f"batch_sizes must be positive and non-empty, got {batch_sizes}")
        # Imported here: Triton comes with CUDA builds of torch only.
        from kernels.paged_attention import decode_num_splits

        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.precision = precision
        self.batch_sizes = sorted(set(batch_sizes))
        self.max_blocks_per_seq = kv_cache.shape[0]
        device = kv_cache.device
        max_batch = self.batch_sizes[-1]
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        longest_context = self.max_blocks_per_seq * block_size
        self.num_splits = {b: decode_num_splits(b, kv_cache.shape[4], longest_context, num_sms)
                           for b in self.batch_sizes}
        with torch.inference_mode():
            self.token_inputs = torch.zeros(4, max_batch, dtype=torch.long, device=device)
            self.block_tables = torch.zeros(max_batch, self.max_blocks_per_seq, dtype=torch.int32, device=device)
            self.context_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
            self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
            self.logits: dict[int, torch.Tensor] = {}  # [batch, vocab] fp32, written by each replay
            pool = None
            for batch in reversed(self.batch_sizes):
                self.graphs[batch], self.logits[batch] = self._capture(batch, pool)
                pool = self.graphs[batch].pool()

    def padded_batch_size(self, num_seqs: int) -> int | None:
        """The captured size a batch of num_seqs replays, or None (too large: run eagerly)."""
        return next((b for b in self.batch_sizes if b >= num_seqs), None)

    def replay(
        self,
        input_ids: list[int],
        positions: list[int],
        slot_blocks: list[int],
        slot_offsets: list[int],
        block_tables: list[list[int]],
        context_lens: list[int],
    ) -> torch.Tensor:
        """One decode step of len(input_ids) sequences -> logits [sequences, vocab] fp32 (a new tensor)."""
        num_seqs = len(input_ids)
        batch = self.padded_batch_size(num_seqs)
        if batch is None:
            raise ValueError(f"{num_seqs} sequences exceed the largest captured batch {self.batch_sizes[-1]}")
        pad = batch - num_seqs
        width = max(len(t) for t in block_tables)
        if width > self.max_blocks_per_seq:
            raise ValueError(f"a block table of {width} blocks exceeds the cache's {self.max_blocks_per_seq}")
        host_inputs = torch.tensor([input_ids + [0] * pad, positions + [0] * pad,
                                    slot_blocks + [PADDING_SLOT_BLOCK] * pad, slot_offsets + [0] * pad],
                                   dtype=torch.long)
        self.token_inputs[:, :batch].copy_(host_inputs)
        self.context_lens[:batch].copy_(torch.tensor(context_lens + [0] * pad, dtype=torch.int32))
        self.block_tables[:batch, :width].copy_(pack_block_tables(block_tables, batch, width))
        self.graphs[batch].replay()
        return self.logits[batch][:num_seqs].clone()

    def _capture(self, batch: int, pool: tuple[int, int] | None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # The capture batch is all padding: nothing is stored, attention reads nothing.
        self.token_inputs[:, :batch] = 0
        self.token_inputs[2, :batch] = PADDING_SLOT_BLOCK
        self.context_lens[:batch] = 0
        input_ids, positions = self.token_inputs[0, :batch], self.token_inputs[1, :batch]
        meta = AttentionMetadata(
            query_lens=[1] * batch,
            context_lens=[0] * batch,
            block_tables=[[] for _ in range(batch)],
            slot_blocks=self.token_inputs[2, :batch],
            slot_offsets=self.token_inputs[3, :batch],
            block_size=self.block_size,
            decode=DecodeTensors(self.block_tables[:batch], self.context_lens[:batch], self.num_splits[batch]),
        )

        def forward() -> torch.Tensor:
            hidden = self.model(input_ids, positions, self.kv_cache, meta, self.precision)  # [batch, hidden]
            return self.model.compute_logits(hidden)  # [batch, vocab] fp32

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = forward()
        return graph, logits
