"""Device-free paged-KV bookkeeping: block ids, reference counts, and a prefix cache over full blocks.

The block manager never touches a tensor. It decides which cache blocks a sequence uses; the runner
writes k/v into them. A full block whose k/v is computed is registered under a hash chained over all
tokens up to its end, `hash(previous block's hash, this block's tokens)`, so equal prefixes map to the
same blocks and a later request reuses them. Freed blocks keep their hash and stay findable until
they are handed out again (least recently freed first), which is what makes multi-turn agent
sessions hit. The hash is a stable 64-bit blake2b digest, equal across processes and hosts, so a
router can reason about which replica holds which prefix.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence as Seq

import numpy as np

from mixquant_serve.engine.sequence import Sequence

NO_HASH = -1


def chain_hash(token_ids: Seq[int], previous_hash: int) -> int:
    """Hash of one full block of tokens, chained to the hash of the block before it."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(previous_hash.to_bytes(8, "little", signed=True))
    digest.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return int.from_bytes(digest.digest(), "little", signed=True) & 0x7FFF_FFFF_FFFF_FFFF


def prefix_block_hashes(token_ids: Seq[int], block_size: int, max_tokens: int | None = None) -> list[int]:
    """Chain hashes of the full blocks within the first `max_tokens` tokens."""
    limit = len(token_ids) if max_tokens is None else min(max_tokens, len(token_ids))
    hashes, previous = [], NO_HASH
    for start in range(0, limit - block_size + 1, block_size):
        previous = chain_hash(token_ids[start : start + block_size], previous)
        hashes.append(previous)
    return hashes


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int = NO_HASH
    token_ids: tuple[int, ...] = field(default=())  # kept with the hash to rule out collisions


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block: dict[int, int] = {}
        # free blocks in eviction order: the first is handed out first; cached ones stay findable until then
        self.free_block_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_blocks(self, token_ids: Seq[int], max_tokens: int) -> list[int]:
        """Block ids holding the longest cached prefix of token_ids[:max_tokens], full blocks only."""
        found = []
        for index, block_hash in enumerate(prefix_block_hashes(token_ids, self.block_size, max_tokens)):
            block_id = self.hash_to_block.get(block_hash)
            start = index * self.block_size
            if block_id is None or self.blocks[block_id].token_ids != tuple(token_ids[start : start + self.block_size]):
                break
            found.append(block_id)
        return found

    def num_cached_tokens(self, token_ids: Seq[int], max_tokens: int) -> int:
        return len(self.cached_blocks(token_ids, max_tokens)) * self.block_size

    def can_allocate(self, token_ids: Seq[int], num_tokens: int, max_cached_tokens: int) -> bool:
        hits = self.cached_blocks(token_ids, min(max_cached_tokens, num_tokens))
        reclaimed_from_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return self.blocks_for(num_tokens) - len(hits) <= self.num_free_blocks - reclaimed_from_free

    # ---- changes ---------------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_tokens: int, max_cached_tokens: int) -> None:
        """Gives `seq` blocks for its first `num_tokens` tokens, reusing cached prefix blocks.

        At most `max_cached_tokens` tokens are taken from the cache (a generating sequence must compute
        at least its last prompt token to get logits). Sets num_cached_tokens and num_computed_tokens.
        """
        assert not seq.block_table, f"{seq.request_id} already holds blocks"
        if not self.can_allocate(seq.token_ids, num_tokens, max_cached_tokens):
            raise RuntimeError(f"out of KV blocks for {seq.request_id}: call can_allocate first")
        hits = self.cached_blocks(seq.token_ids, min(max_cached_tokens, num_tokens))
        for block_id in hits:
            self._take(block_id)
        seq.block_table = hits + [self._take_free() for _ in range(self.blocks_for(num_tokens) - len(hits))]
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
        seq.block_hashes = prefix_block_hashes(seq.token_ids, self.block_size, len(hits) * self.block_size)

    def can_append(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_tokens: int) -> None:
        """Grows seq's block table to cover `num_tokens` tokens."""
        missing = self.blocks_for(num_tokens) - len(seq.block_table)
        if missing > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks for {seq.request_id}: call can_append first")
        seq.block_table.extend(self._take_free() for _ in range(missing))

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Enters every full block whose k/v is now computed into the prefix cache."""
        full = min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size
        for index in range(len(seq.block_hashes), full):
            tokens = tuple(seq.token_ids[index * self.block_size : (index + 1) * self.block_size])
            block_hash = chain_hash(tokens, seq.block_hashes[-1] if seq.block_hashes else NO_HASH)
            seq.block_hashes.append(block_hash)
            if block_hash not in self.hash_to_block:  # else a twin block computed elsewhere keeps the entry
                block = self.blocks[seq.block_table[index]]
                self._unhash(block)
                block.hash, block.token_ids = block_hash, tokens
                self.hash_to_block[block_hash] = block.block_id

    def free(self, seq: Sequence) -> None:
        """Drops seq's references; blocks reaching zero stay cached until reused (LRU)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed more often than taken"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table = []
        seq.block_hashes = []

    def fork(self, parent: Sequence, child: Sequence) -> list[tuple[int, int]]:
        """Makes child share parent's computed blocks. Returns (src, dst) block copies the runner must do.

        Full computed blocks are shared by reference; the last, partly filled block is copied into a
        fresh block so each sequence can append to its own.
        """
        assert not child.block_table, f"{child.request_id} already holds blocks"
        full = parent.num_computed_tokens // self.block_size
        partial = parent.num_computed_tokens % self.block_size != 0
        if partial and self.num_free_blocks < 1:
            raise RuntimeError(f"out of KV blocks to fork {parent.request_id}")
        for block_id in parent.block_table[:full]:
            self._take(block_id)
        child.block_table = list(parent.block_table[:full])
        copies = []
        if partial:
            fresh = self._take_free()
            copies.append((parent.block_table[full], fresh))
            child.block_table.append(fresh)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_tokens = parent.num_cached_tokens
        child.block_hashes = list(parent.block_hashes[:full])
        return copies

    # ---- internals -----------------------------------------------------------------------------
    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_block_ids[block_id]
        block.ref_count += 1

    def _take_free(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        self._unhash(block)
        block.ref_count = 1
        return block_id

    def _unhash(self, block: Block) -> None:
        if block.hash != NO_HASH and self.hash_to_block.get(block.hash) == block.block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids = NO_HASH, ()

    def check_invariants(self, live_tables: Seq[Seq[int]] | None = None) -> None:
        """Asserts the bookkeeping is consistent; with the live block tables, that ref counts match them."""
        for block in self.blocks:
            assert block.ref_count >= 0, block
            assert (block.ref_count == 0) == (block.block_id in self.free_block_ids), block
        for block_hash, block_id in self.hash_to_block.items():
            assert self.blocks[block_id].hash == block_hash, (block_hash, block_id)
        if live_tables is not None:
            counts = [0] * self.num_blocks
            for table in live_tables:
                for block_id in table:
                    counts[block_id] += 1
            for block in self.blocks:
                assert counts[block.block_id] == block.ref_count, (block, counts[block.block_id])
