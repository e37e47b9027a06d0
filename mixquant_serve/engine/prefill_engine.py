"""PrefillEngine: computes the KV of prompt[cached:-1] in the quantized prefill precision.

It never samples. A finished prefill keeps its blocks pinned, so the decode side can pull them, until
`release` (the decode side reported the pull done) or until its lease expires; then the blocks return
to the prefix cache, where the next turn of the same agent session finds them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence as Seq

import torch

from mixquant_serve.engine.config import EngineConfig
from mixquant_serve.engine.core import EngineCore
from mixquant_serve.engine.sequence import Sequence
from mixquant_serve.model.llama import LlamaForCausalLM
from mixquant_serve.quant.precision import Precision


@dataclass
class PrefillResult:
    request_id: str
    block_ids: list[int]  # blocks holding the k/v of all `num_tokens` tokens, in order
    num_tokens: int
    num_cached_tokens: int  # of those, found in this engine's prefix cache
    seconds: float  # from add_request to the end of the last chunk


class PrefillEngine:
    def __init__(self, model: LlamaForCausalLM, config: EngineConfig, precision: Precision, device: torch.device):
        self.core = EngineCore(model, config, precision, device)
        self.pinned: dict[str, tuple[Sequence, float]] = {}  # request id -> (sequence, lease deadline)
        self._started: dict[str, float] = {}

    @property
    def kv_cache(self) -> torch.Tensor:
        return self.core.kv_cache

    def num_cached_tokens(self, token_ids: Seq[int]) -> int:
        return self.core.block_manager.num_cached_tokens(token_ids, len(token_ids))

    def add_request(self, request_id: str, token_ids: Seq[int]) -> None:
        """Queues the computation of the k/v of `token_ids` (the caller passes prompt[:-1])."""
        if request_id in self._started or request_id in self.pinned:
            raise ValueError(f"request_id {request_id!r} is already in the prefill engine")
        self.core.validate_tokens(token_ids, len(token_ids), "prompt")
        self._started[request_id] = time.perf_counter()
        self.core.scheduler.add(Sequence(request_id, list(token_ids), len(token_ids), sampling=None))

    def has_unfinished(self) -> bool:
        return self.core.scheduler.has_unfinished()

    def step(self) -> list[PrefillResult]:
        """One engine step: schedule, run, postprocess. Returns the prefills that completed."""
        batch = self.core.scheduler.schedule()
        if not batch:
            return []
        self.core.runner.run(batch)
        return self._postprocess(batch.seqs, batch.num_new_tokens)

    def prefill(self, request_id: str, token_ids: Seq[int]) -> PrefillResult:
        """Synchronous convenience: queues one request and steps until it completes."""
        self.add_request(request_id, token_ids)
        while True:
            for result in self.step():
                if result.request_id == request_id:
                    return result

    def release(self, request_id: str) -> bool:
        """Unpins a finished prefill's blocks (they stay in the prefix cache). False if not pinned."""
        entry = self.pinned.pop(request_id, None)
        if entry is None:
            return False
        self.core.block_manager.free(entry[0])
        return True

    def expire_leases(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        expired = [rid for rid, (_, deadline) in self.pinned.items() if deadline <= now]
        for request_id in expired:
            self.release(request_id)
        return expired

    def abort(self, request_id: str) -> bool:
        """Drops a queued or running prefill, or unpins a finished one."""
        self._started.pop(request_id, None)
        scheduler = self.core.scheduler
        for seq in [*scheduler.waiting, *scheduler.running]:
            if seq.request_id == request_id:
                scheduler.finish(seq, "abort")
                return True
        return self.release(request_id)

    def _postprocess(self, seqs: list[Sequence], num_new_tokens: list[int]) -> list[PrefillResult]:
        finished = []
        for seq, num_new in zip(seqs, num_new_tokens):
            seq.num_computed_tokens += num_new
            self.core.block_manager.register_computed_blocks(seq)
            if seq.num_uncomputed_tokens == 0:
                self.core.scheduler.finish(seq, "prefilled", free_blocks=False)
                self.pinned[seq.request_id] = (seq, time.monotonic() + self.core.config.kv_lease_seconds)
                started = self._started.pop(seq.request_id)
                finished.append(
                    PrefillResult(
                        seq.request_id,
                        list(seq.block_table),
                        len(seq),
                        seq.num_cached_tokens,
                        time.perf_counter() - started,
                    )
                )
        return finished
