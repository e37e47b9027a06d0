"""DecodeEngine: precise (BF16; fp32 on CPU) generation with continuous batching.

A request enters in one of two ways:
- `add_request`: the engine prefills the uncached part of the prompt itself, in its own precision
  (short new turns on top of a cached history, and the fallback when a transfer fails).
- `reserve_for_transfer` + `commit_transfer`: blocks are reserved for the prompt, the caller fills
  those after the locally cached prefix with k/v computed elsewhere (the quantized prefill pool), then
  commits; the engine computes only the last prompt token. Every sampled token, the first included,
  comes from this engine's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence as Seq

import torch

from mixquant_serve.engine.config import EngineConfig
from mixquant_serve.engine.core import EngineCore
from mixquant_serve.engine.cuda_graphs import graph_batch_sizes
from mixquant_serve.engine.output import RequestOutput, StopStringText
from mixquant_serve.engine.sampling import SamplingParams, make_sampler_state, sample
from mixquant_serve.engine.sequence import Sequence
from mixquant_serve.model.llama import LlamaForCausalLM
from mixquant_serve.model.tokenizer import Tokenizer
from mixquant_serve.quant.precision import Precision


@dataclass
class TransferReservation:
    request_id: str
    num_cached_tokens: int  # prompt tokens already in this engine's cache (a multiple of block_size)
    first_block_index: int  # index into the prompt's block list of the first block to fill
    local_block_ids: list[int]  # blocks to fill with the k/v of prompt[num_cached_tokens:-1], in order


class DecodeEngine:
    def __init__(
        self,
        model: LlamaForCausalLM,
        tokenizer: Tokenizer | None,
        config: EngineConfig,
        device: torch.device,
        precision: Precision = "bf16",
    ):
        self.core = EngineCore(model, config, precision, device)
        if device.type == "cuda":  # decode steps replay CUDA graphs (engine/cuda_graphs.py)
            self.core.runner.capture_decode_graphs(graph_batch_sizes(config.max_num_seqs))
        self.tokenizer = tokenizer
        self.device = device
        self.eos_token_ids = set(tokenizer.eos_token_ids if tokenizer else model.config.eos_token_ids)
        self._reserved: dict[str, Sequence] = {}
        self._texts: dict[str, StopStringText | None] = {}
        self._requests: dict[str, Sequence] = {}

    @property
    def kv_cache(self) -> torch.Tensor:
        return self.core.kv_cache

    @property
    def block_size(self) -> int:
        return self.core.config.block_size

    def num_cached_tokens(self, prompt_ids: Seq[int]) -> int:
        """Prompt tokens this engine would take from its prefix cache (at most all but the last)."""
        return self.core.block_manager.num_cached_tokens(prompt_ids, len(prompt_ids) - 1)

    def add_request(self, request_id: str, prompt_ids: Seq[int], sampling: SamplingParams) -> None:
        self.core.scheduler.add(self._new_sequence(request_id, prompt_ids, sampling))

    def reserve_for_transfer(
        self, request_id: str, prompt_ids: Seq[int], sampling: SamplingParams
    ) -> TransferReservation | None:
        """Allocates the prompt's blocks now; None if the cache has no room (then use add_request)."""
        seq = self._new_sequence(request_id, prompt_ids, sampling)
        manager = self.core.block_manager
        if not manager.can_allocate(seq.token_ids, len(seq), len(seq) - 1):
            del self._requests[request_id], self._texts[request_id]
            return None
        manager.allocate(seq, len(seq), len(seq) - 1)
        self._reserved[request_id] = seq
        first = seq.num_cached_tokens // self.block_size
        last = manager.blocks_for(len(seq) - 1)  # blocks holding prompt[:-1]
        return TransferReservation(request_id, seq.num_cached_tokens, first, seq.block_table[first:last])

    def commit_transfer(self, request_id: str, transferred: bool) -> None:
        """Queues a reserved request. transferred=False: the blocks were not filled, prefill them here."""
        seq = self._reserved.pop(request_id)
        if transferred:
            seq.num_computed_tokens = len(seq) - 1
            self.core.block_manager.register_computed_blocks(seq)
        self.core.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        seq = self._requests.get(request_id)
        if seq is None:
            return False
        if request_id in self._reserved:
            del self._reserved[request_id]
            self.core.block_manager.free(seq)
        else:
            self.core.scheduler.finish(seq, "abort")
        self._forget(request_id)
        return True

    def has_unfinished(self) -> bool:
        return self.core.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """One engine step: schedule, run, postprocess."""
        batch = self.core.scheduler.schedule()
        if not batch:
            return []
        step = self.core.runner.run(batch)
        tokens = []
        if step.logits is not None:
            seqs = step.sampled_seqs
            tokens = sample(step.logits, [s.sampling for s in seqs], [s.sampler_state for s in seqs])
        return self._postprocess(batch.seqs, batch.num_new_tokens, dict(zip(map(id, step.sampled_seqs), tokens)))

    def _postprocess(self, seqs: list[Sequence], num_new: list[int], sampled: dict[int, int]) -> list[RequestOutput]:
        outputs = []
        for seq, count in zip(seqs, num_new):
            seq.num_computed_tokens += count
            self.core.block_manager.register_computed_blocks(seq)
            token = sampled.get(id(seq))
            if token is None:
                continue  # a prefill chunk that did not reach the end of the prompt
            outputs.append(self._append_token(seq, token))
        return outputs

    def _append_token(self, seq: Sequence, token: int) -> RequestOutput:
        params = seq.sampling
        assert params is not None
        text = self._texts[seq.request_id]
        reason = None
        delta = ""
        new_tokens = [token]
        if not params.ignore_eos and token in self.eos_token_ids or token in params.stop_token_ids:
            reason = "stop"
            new_tokens = []  # like eos, a stop token ends the output without being part of it
        else:
            seq.token_ids.append(token)
            if text is not None:
                delta = text.push(token)
                if text.stopped:
                    reason = "stop"
            if reason is None and (seq.num_output_tokens >= params.max_tokens or len(seq) >= self.core.max_model_len):
                reason = "length"
        if reason is not None:
            if text is not None and reason == "length":
                delta += text.flush()
            self.core.scheduler.finish(seq, reason)
            self._forget(seq.request_id)
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_tokens,
            text_delta=delta,
            finished=reason is not None,
            finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            num_output_tokens=seq.num_output_tokens,
        )

    def _new_sequence(self, request_id: str, prompt_ids: Seq[int], sampling: SamplingParams) -> Sequence:
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in the decode engine")
        self.core.validate_tokens(prompt_ids, len(prompt_ids) + sampling.max_tokens, "prompt")
        seq = Sequence(
            request_id,
            list(prompt_ids),
            len(prompt_ids),
            sampling=sampling,
            sampler_state=make_sampler_state(sampling, self.device),
        )
        self._requests[request_id] = seq
        self._texts[request_id] = StopStringText(self.tokenizer, sampling.stop) if self.tokenizer else None
        return seq

    def _forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self._texts.pop(request_id, None)
