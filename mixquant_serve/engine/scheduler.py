"""Continuous batching policy: which sequences compute how many tokens this step. Never touches tensors.

Each step has a token budget. Running sequences go first, oldest first: a decoding sequence takes one
token, a sequence still prefilling takes its next chunk. Then waiting sequences are admitted in
arrival order while blocks and budget last; admission looks up the prefix cache, so only uncached
tokens are computed. When the cache is full the newest running sequence is preempted: its blocks are
freed and it is recomputed later (its cached prefix blocks usually survive in the prefix cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from mixquant_serve.engine.block_manager import BlockManager
from mixquant_serve.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # per seq; 0 for a fully cached prefill

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        preempted_now = False
        for seq in list(self.running):
            if seq not in self.running:  # preempted while making room for an older sequence
                continue
            if budget == 0 or len(batch.seqs) >= self.max_num_seqs:
                break
            num_new = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.can_append(seq, seq.num_computed_tokens + num_new):
                self._preempt(self.running[-1])
                preempted_now = True
                if seq.status is SequenceStatus.WAITING:
                    break
            if seq.status is SequenceStatus.WAITING:
                continue
            self.block_manager.append_slots(seq, seq.num_computed_tokens + num_new)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        while self.waiting and not preempted_now and budget > 0 and len(batch.seqs) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                # a generating sequence must compute its last token itself to get logits
                max_cached = len(seq) if seq.is_prefill_only else len(seq) - 1
                if not self.block_manager.can_allocate(seq.token_ids, len(seq), max_cached):
                    break
                self.block_manager.allocate(seq, len(seq), max_cached)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_new = min(seq.num_uncomputed_tokens, budget)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        return batch

    def finish(self, seq: Sequence, reason: str, free_blocks: bool = True) -> None:
        """Ends a sequence; a finished prefill keeps its blocks (pinned for transfer) with free_blocks=False."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if free_blocks:
            self.block_manager.free(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
