"""The workers' orchestration without Ray: real engines on a tiny model, real NIXL between them."""

from __future__ import annotations

import asyncio

import pytest
import torch

from mixquant_serve.engine.build import build_local_pipeline
from mixquant_serve.engine.config import EngineConfig
from mixquant_serve.engine.decode_engine import DecodeEngine
from mixquant_serve.engine.prefill_engine import PrefillEngine
from mixquant_serve.engine.sampling import SamplingParams
from mixquant_serve.model.loader import load_model
from mixquant_serve.protocol import GenerateRequest
from mixquant_serve.transfer.base import KVTransferError
from mixquant_serve.transfer.nixl import NixlTransport
from workers.decode import DecodeParts, DecodeSettings, DecodeWorker
from workers.prefill import PrefillParts, PrefillWorker

CPU = torch.device("cpu")
ENGINE = EngineConfig(block_size=4, num_kv_blocks=64, kv_lease_seconds=30.0)
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    return load_model("synthetic:tiny-llama", CPU, torch.float32, {"bf16", "nvfp4"}, progress=False)


class Remote:
    """Stands in for a Serve deployment handle: handle.method.remote(arg) returns an awaitable."""

    def __init__(self, target, fail: Exception | None = None):
        self.target, self.fail = target, fail

    def __getattr__(self, method):
        target, fail = self.target, self.fail

        class Method:
            @staticmethod
            def remote(*args):
                async def call():
                    if fail is not None:
                        raise fail
                    return await getattr(target, method)(*args)

                return asyncio.ensure_future(call())

        return Method


def make_workers(tiny, fault=None, prefill_fails=None, local_prefill_tokens=0):
    prefill = PrefillWorker(
        lambda name: PrefillParts(PrefillEngine(tiny.model, ENGINE, "nvfp4", CPU), NixlTransport(name))
    )
    decode = DecodeWorker(
        lambda name: DecodeParts(DecodeEngine(tiny.model, None, ENGINE, CPU), NixlTransport(name, fault_injector=fault)),
        Remote(prefill, prefill_fails),
        DecodeSettings(local_prefill_tokens=local_prefill_tokens, prefill_timeout_s=30, kv_transfer_timeout_s=5),
    )
    return prefill, decode


async def collect(decode, request):
    chunks = [c async for c in decode.generate(request)]
    return [t for c in chunks for t in c.token_ids], chunks[-1]


def expected_tokens(tiny, prompt, precision="nvfp4"):
    pipeline, _ = build_local_pipeline("unused", precision, CPU, ENGINE, 0, loaded=tiny)
    return pipeline.generate(prompt, GREEDY).token_ids


def prompt_of(n, seed=0):
    return torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_remote_prefill_over_nixl_then_local_turn(tiny):
    async def main():
        prefill, decode = make_workers(tiny, local_prefill_tokens=6)
        history = prompt_of(30)
        tokens, last = await collect(decode, GenerateRequest("r1", "s1", history, GREEDY))
        assert tokens == expected_tokens(tiny, history)
        assert last.stats.prefill == "remote" and last.stats.prefill_precision == "nvfp4"
        assert last.stats.kv_transfer_bytes > 0 and last.finish_reason == "length"
        for _ in range(50):  # the pull's notification unpins the prefill blocks
            if not prefill.engine.pinned:
                break
            await asyncio.sleep(0.02)
        assert not prefill.engine.pinned and prefill.num_released_by_notification == 1
        # next turn: 4 new tokens on top of the cached history -> prefilled locally, history reused
        turn2 = history + tokens + [1, 2, 3, 4]
        _, last2 = await collect(decode, GenerateRequest("r2", "s1", turn2, GREEDY))
        assert last2.stats.prefill == "local" and last2.stats.cached_tokens_decode >= 32
        assert decode.engine.core.block_manager.num_used_blocks == 0

    asyncio.run(main())


def test_prefill_failure_falls_back_to_local_prefill(tiny):
    async def main():
        _, decode = make_workers(tiny, prefill_fails=RuntimeError("replica died"))
        prompt = prompt_of(25, seed=1)
        tokens, last = await collect(decode, GenerateRequest("r1", "s1", prompt, GREEDY))
        assert last.stats.prefill == "local" and "replica died" in last.stats.fallback_reason
        assert tokens == expected_tokens(tiny, prompt, precision="bf16")  # all-precise fallback
        assert decode.counters["fallbacks"] == 1

    asyncio.run(main())


def test_pull_failure_falls_back_and_prefill_releases(tiny):
    def fault(point):
        if point == "before_read":
            raise RuntimeError("injected pull failure")

    async def main():
        prefill, decode = make_workers(tiny, fault=fault)
        prompt = prompt_of(25, seed=2)
        tokens, last = await collect(decode, GenerateRequest("r1", "s1", prompt, GREEDY))
        assert last.stats.prefill == "local" and "kv transfer failed" in last.stats.fallback_reason
        assert tokens == expected_tokens(tiny, prompt, precision="bf16")
        for _ in range(50):
            if not prefill.engine.pinned:
                break
            await asyncio.sleep(0.02)
        assert not prefill.engine.pinned  # released by the decode side's notification, before the lease

    asyncio.run(main())


def test_cancelled_stream_frees_decode_blocks(tiny):
    async def main():
        _, decode = make_workers(tiny)
        stream = decode.generate(GenerateRequest("r1", "s1", prompt_of(20, seed=3), SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)))
        first = await stream.__anext__()
        assert first.token_ids
        await stream.aclose()
        assert decode.engine.core.block_manager.num_used_blocks == 0
        assert not decode.engine.has_unfinished()

    asyncio.run(main())


def test_unreachable_prefill_replica_blocks_return_at_lease_expiry(tiny):
    """The pull fails and the release notification cannot be sent: the lease frees the blocks."""
    def fault(point):
        if point == "before_read":
            raise RuntimeError("link down")

    async def main():
        prefill, decode = make_workers(tiny, fault=fault)
        decode.transport.send_notification = lambda peer, msg: (_ for _ in ()).throw(KVTransferError("unreachable"))
        _, last = await collect(decode, GenerateRequest("r1", "s1", prompt_of(25, seed=4), GREEDY))
        assert last.stats.prefill == "local"
        assert prefill.engine.pinned  # still pinned: nobody told it
        import time

        prefill.engine.expire_leases(time.monotonic() + 31.0)
        assert not prefill.engine.pinned
        assert prefill.engine.core.block_manager.num_used_blocks == 0

    asyncio.run(main())
