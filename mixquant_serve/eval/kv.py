"""Forkable KV sequences over one paged cache: compute a prompt's KV once, branch it per configuration.

The quality evaluation prefills each shared context once per prefill precision, then branches it:
context -> item prompt -> one branch per configuration (teacher forcing, greedy decoding). A branch
shares its parent's full blocks (read only: nothing writes below a branch point) and gets a private
copy of the parent's last, partial block, so what one configuration writes never reaches another.

    cache: [num_blocks, num_layers, 2 (k, v), block_size, num_kv_heads, head_dim]   (engine layout)

Invariants, asserted: a sequence with live branches is frozen (no forward, no truncation); a branch
writes only at positions >= its branch point; a sequence is freed after all its branches. Freshly
allocated blocks are filled with NaN, so a read of k/v that no forward of this lineage wrote turns
the logits into NaN instead of silently borrowing another configuration's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mixquant_serve.engine.kv_cache import allocate_kv_cache
from mixquant_serve.model.attention import AttentionMetadata
from mixquant_serve.model.llama import LlamaForCausalLM
from mixquant_serve.quant.precision import Precision


@dataclass
class KVSequence:
    """One lineage's tokens in the cache: block_table[i] holds positions [i * block_size, (i + 1) * block_size)."""

    block_table: list[int]
    num_tokens: int
    owned_blocks: list[int]  # blocks this sequence allocated (freed with it); the rest belong to ancestors
    branch_point: int  # positions below it belong to the parent: never written through this sequence
    parent: KVSequence | None = None
    live_branches: int = 0
    freed: bool = field(default=False)


class ForkableKVCache:
    """A paged KV cache with a free list, forward passes that append tokens, and copy-on-branch forks."""

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, device: torch.device):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.model = model
        self.block_size = block_size
        self.device = device
        self.cache = allocate_kv_cache(model.config, num_blocks, block_size, model.dtype, device)
        self._free_blocks = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    def new_sequence(self) -> KVSequence:
        return KVSequence(block_table=[], num_tokens=0, owned_blocks=[], branch_point=0)

    def branch(self, parent: KVSequence) -> KVSequence:
        """A new sequence that continues from parent's tokens; parent is frozen until the branch is freed."""
        self._check_alive(parent, "parent")
        full_blocks = parent.num_tokens // self.block_size
        table = parent.block_table[:full_blocks]
        owned: list[int] = []
        if parent.num_tokens % self.block_size:
            (copy,) = self._allocate(1)
            self.cache[copy] = self.cache[parent.block_table[full_blocks]]
            table.append(copy)
            owned.append(copy)
        parent.live_branches += 1
        return KVSequence(table, parent.num_tokens, owned, branch_point=parent.num_tokens, parent=parent)

    def truncate(self, seq: KVSequence, num_tokens: int) -> None:
        """Forgets seq's tokens from num_tokens on (their slots are overwritten by the next forward)."""
        self._check_writable(seq)
        if not seq.branch_point <= num_tokens <= seq.num_tokens:
            raise ValueError(
                f"num_tokens must lie in [branch point {seq.branch_point}, current {seq.num_tokens}], got {num_tokens}"
            )
        seq.num_tokens = num_tokens

    def free(self, seq: KVSequence) -> None:
        self._check_alive(seq, "seq")
        if seq.live_branches:
            raise RuntimeError(f"a sequence with {seq.live_branches} live branches cannot be freed")
        self._free_blocks.extend(reversed(seq.owned_blocks))
        seq.owned_blocks, seq.freed = [], True
        if seq.parent is not None:
            seq.parent.live_branches -= 1

    @torch.inference_mode()
    def forward(self, seq: KVSequence, token_ids: list[int], precision: Precision) -> torch.Tensor:
        """Appends token_ids to seq in one forward pass; returns their hidden states [len(token_ids), hidden]."""
        self._check_writable(seq)
        if not token_ids:
            raise ValueError("token_ids must be non-empty")
        start, end = seq.num_tokens, seq.num_tokens + len(token_ids)
        needed_blocks = -(-end // self.block_size) - len(seq.block_table)
        if needed_blocks > 0:
            new_blocks = self._allocate(needed_blocks)
            seq.block_table.extend(new_blocks)
            seq.owned_blocks.extend(new_blocks)
        positions = torch.arange(start, end, device=self.device)
        table = torch.tensor(seq.block_table, dtype=torch.long, device=self.device)
        meta = AttentionMetadata(
            query_lens=[len(token_ids)],
            context_lens=[end],
            block_tables=[seq.block_table],
            slot_blocks=table[positions // self.block_size],
            slot_offsets=positions % self.block_size,
            block_size=self.block_size,
        )
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        hidden = self.model(ids, positions, self.cache, meta, precision)  # [tokens, hidden]
        seq.num_tokens = end
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [tokens, hidden] -> [tokens, vocab] fp32
        with torch.inference_mode():
            return self.model.compute_logits(hidden)

    def _allocate(self, count: int) -> list[int]:
        if count > len(self._free_blocks):
            raise RuntimeError(f"KV cache full: {count} blocks wanted, {len(self._free_blocks)} free")
        blocks = [self._free_blocks.pop() for _ in range(count)]
        self.cache[torch.tensor(blocks, dtype=torch.long, device=self.device)] = float("nan")
        return blocks

    def _check_alive(self, seq: KVSequence, name: str) -> None:
        if seq.freed:
            raise RuntimeError(f"{name} was already freed")

    def _check_writable(self, seq: KVSequence) -> None:
        self._check_alive(seq, "seq")
        if seq.live_branches:
            raise RuntimeError(f"seq has {seq.live_branches} live branches: it is frozen until they are freed")
