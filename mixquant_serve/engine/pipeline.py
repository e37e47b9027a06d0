"""One request's path through a prefill engine and a decode engine: the disaggregation protocol.

    decode prefix lookup -> uncached <= local_prefill_tokens ? prefill locally (precise)
                                                       : reserve blocks on decode
                                                         -> prefill engine computes prompt[:-1] (quantized)
                                                         -> decode pulls the blocks it lacks, notifies
                                                         -> prefill unpins; decode runs the last prompt token
    continuous-batching decode until a stop condition

This module runs both engines in one process over a KVTransport pair (in-process copies for
`mixquant generate` and tests). The Serve workers follow the same protocol across processes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterator, Literal, Sequence as Seq

from mixquant_serve.engine.decode_engine import DecodeEngine
from mixquant_serve.engine.output import RequestOutput
from mixquant_serve.engine.prefill_engine import PrefillEngine
from mixquant_serve.engine.sampling import SamplingParams
from mixquant_serve.transfer.base import KVTransferError, KVTransport

TRANSFER_TIMEOUT_S = 30.0


@dataclass
class PrefillReport:
    """Where and how a request's prompt was prefilled."""

    prefill: Literal["remote", "local"]
    prefill_precision: str
    cached_tokens_decode: int
    cached_tokens_prefill: int = 0
    kv_transfer_bytes: int = 0
    kv_transfer_ms: float = 0.0
    prefill_ms: float = 0.0
    fallback_reason: str | None = None


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    report: PrefillReport | None = None


class LocalPipeline:
    def __init__(
        self,
        prefill: PrefillEngine,
        decode: DecodeEngine,
        prefill_transport: KVTransport,
        decode_transport: KVTransport,
        local_prefill_tokens: int,
    ):
        if prefill.core.config.block_size != decode.core.config.block_size:
            raise ValueError("prefill and decode engines must use the same block_size")
        self.prefill = prefill
        self.decode = decode
        self.prefill_transport = prefill_transport
        self.decode_transport = decode_transport
        self.local_prefill_tokens = local_prefill_tokens
        prefill_transport.register_cache(prefill.kv_cache)
        decode_transport.register_cache(decode.kv_cache)
        self.prefill_peer = decode_transport.add_peer(prefill_transport.metadata())
        self._ids = itertools.count()

    def start(self, prompt_ids: Seq[int], sampling: SamplingParams, request_id: str | None = None) -> PrefillReport:
        """Admits a request into the decode engine, prefilling remotely or locally. Returns how."""
        request_id = request_id or f"req-{next(self._ids)}"
        cached = self.decode.num_cached_tokens(prompt_ids)
        uncached = len(prompt_ids) - 1 - cached
        if uncached <= self.local_prefill_tokens:
            self.decode.add_request(request_id, prompt_ids, sampling)
            return PrefillReport("local", self.decode.core.precision, cached)
        reservation = self.decode.reserve_for_transfer(request_id, prompt_ids, sampling)
        if reservation is None:
            self.decode.add_request(request_id, prompt_ids, sampling)
            return PrefillReport("local", self.decode.core.precision, cached, fallback_reason="decode cache full")
        result = self.prefill.prefill(request_id, prompt_ids[:-1])
        report = PrefillReport(
            "remote",
            self.prefill.core.precision,
            cached_tokens_decode=reservation.num_cached_tokens,
            cached_tokens_prefill=result.num_cached_tokens,
            prefill_ms=result.seconds * 1e3,
        )
        try:
            stats = self.decode_transport.read_blocks(
                self.prefill_peer,
                result.block_ids[reservation.first_block_index :],
                reservation.local_block_ids,
                notify_msg=request_id.encode(),
                timeout_s=TRANSFER_TIMEOUT_S,
            )
        except KVTransferError as error:
            self.prefill.release(request_id)
            self.decode.commit_transfer(request_id, transferred=False)
            report.prefill, report.prefill_precision = "local", self.decode.core.precision
            report.fallback_reason = f"kv transfer failed: {error}"
            return report
        for _, message in self.prefill_transport.get_notifications():
            self.prefill.release(message.decode())
        self.decode.commit_transfer(request_id, transferred=True)
        report.kv_transfer_bytes, report.kv_transfer_ms = stats.bytes, stats.seconds * 1e3
        return report

    def stream(self) -> Iterator[RequestOutput]:
        """Steps the decode engine until every admitted request finished."""
        while self.decode.has_unfinished():
            yield from self.decode.step()

    def generate(self, prompt_ids: Seq[int], sampling: SamplingParams) -> Generation:
        return self.generate_many([prompt_ids], sampling)[0]

    def generate_many(self, prompts: Seq[Seq[int]], sampling: SamplingParams) -> list[Generation]:
        """Admits all prompts, then decodes them together with continuous batching."""
        generations = {}
        for prompt in prompts:
            request_id = f"req-{next(self._ids)}"
            generations[request_id] = Generation(report=self.start(prompt, sampling, request_id))
        for output in self.stream():
            generation = generations[output.request_id]
            generation.token_ids.extend(output.new_token_ids)
            generation.text += output.text_delta
            if output.finished:
                generation.finish_reason = output.finish_reason
        return list(generations.values())

