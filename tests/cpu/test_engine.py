"""Engine mechanics on a tiny synthetic model: batching, chunking, preemption, prefix cache, hand-off."""

from __future__ import annotations

import pytest
import torch

from mixquant_serve.engine.build import build_local_pipeline
from mixquant_serve.engine.config import EngineConfig
from mixquant_serve.engine.sampling import SamplingParams
from mixquant_serve.model.loader import load_model

CPU = torch.device("cpu")
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    return load_model("synthetic:tiny-llama", CPU, torch.float32, {"bf16", "nvfp4", "fp8"}, progress=False)


def pipeline(tiny, precision="bf16", local_prefill_tokens=0, **engine):
    config = EngineConfig(**{"block_size": 4, "num_kv_blocks": 64, **engine})
    return build_local_pipeline("unused", precision, CPU, config, local_prefill_tokens, loaded=tiny)[0]


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 500, (length + 3 * i,), generator=g).tolist() for i in range(n)]


def test_remote_and_local_prefill_agree_in_bf16(tiny):
    prompt = prompts(1, 23)[0]
    remote = pipeline(tiny).generate(prompt, GREEDY)
    local = pipeline(tiny, local_prefill_tokens=10_000).generate(prompt, GREEDY)
    assert remote.report.prefill == "remote" and local.report.prefill == "local"
    assert remote.report.kv_transfer_bytes > 0
    assert remote.token_ids == local.token_ids and len(remote.token_ids) == 12


def test_batched_equals_one_at_a_time_with_chunked_prefill(tiny):
    batch = prompts(5, 17)
    alone = [pipeline(tiny).generate(p, GREEDY).token_ids for p in batch]
    together = pipeline(tiny, local_prefill_tokens=10_000, max_num_batched_tokens=16).generate_many(batch, GREEDY)
    assert [g.token_ids for g in together] == alone


def test_preemption_recomputes_and_keeps_outputs(tiny):
    batch = prompts(4, 20)
    alone = [pipeline(tiny).generate(p, GREEDY).token_ids for p in batch]
    # 24 blocks of 4 tokens cannot hold 4 sequences of ~30 tokens at once: the newest gets preempted
    squeezed = pipeline(tiny, local_prefill_tokens=10_000, num_kv_blocks=24)
    together = squeezed.generate_many(batch, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert squeezed.decode.core.scheduler.num_preemptions > 0
    assert [g.token_ids for g in together] == alone
    squeezed.decode.core.block_manager.check_invariants([])


def test_prefix_cache_hits_on_both_pools_and_keeps_greedy_output(tiny):
    history = prompts(1, 40, seed=3)[0]
    turn2 = history + [7, 8, 9, 10, 11, 12, 13]
    cold = pipeline(tiny).generate(turn2, GREEDY)
    warm_pipeline = pipeline(tiny)
    warm_pipeline.generate(history, GREEDY)
    warm = warm_pipeline.generate(turn2, GREEDY)
    assert cold.report.cached_tokens_decode == 0 and cold.report.cached_tokens_prefill == 0
    # decode holds history's 40 prompt tokens (10 full blocks: 39 pulled + the last computed locally);
    # the prefill pool holds the 9 full blocks of history[:-1]
    assert warm.report.cached_tokens_decode == 40
    assert warm.report.cached_tokens_prefill == 36
    assert warm.report.prefill == "remote"
    assert warm.token_ids == cold.token_ids
    # the prefill pool's pinned blocks were released after the pull, both caches are consistent
    assert not warm_pipeline.prefill.pinned
    warm_pipeline.prefill.core.block_manager.check_invariants([])
    warm_pipeline.decode.core.block_manager.check_invariants([])


@pytest.mark.parametrize("precision", ["nvfp4", "fp8"])
def test_quantized_prefill_then_precise_first_token(tiny, precision):
    """The first output token comes from the precise decoder on top of quantized-prefill KV."""
    prompt = prompts(1, 30, seed=5)[0]
    p = pipeline(tiny, precision)
    generation = p.generate(prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    assert generation.report.prefill == "remote" and generation.report.prefill_precision == precision

    model = tiny.model
    expected_first = _first_token(model, prompt, prefix_precision=precision, last_precision="bf16")
    all_quantized = _logits(model, prompt, prefix_precision=precision, last_precision=precision)
    mixed = _logits(model, prompt, prefix_precision=precision, last_precision="bf16")
    assert generation.token_ids == [expected_first]
    assert not torch.allclose(all_quantized, mixed), "the last token must not run through quantized linears"


def _logits(model, prompt, prefix_precision, last_precision):
    from mixquant_serve.engine.kv_cache import allocate_kv_cache
    from mixquant_serve.model.attention import AttentionMetadata

    block_size = 4
    cache = allocate_kv_cache(model.config, 16, block_size, torch.float32, CPU)
    table = list(range(16))

    def run(tokens, start, precision):
        n = len(tokens)
        positions = torch.arange(start, start + n)
        meta = AttentionMetadata([n], [start + n], [table], positions // block_size, positions % block_size, block_size)
        with torch.inference_mode():
            return model(torch.tensor(tokens), positions, cache, meta, precision)

    run(prompt[:-1], 0, prefix_precision)
    hidden = run(prompt[-1:], len(prompt) - 1, last_precision)
    return model.compute_logits(hidden)[0]


def _first_token(model, prompt, prefix_precision, last_precision):
    return int(_logits(model, prompt, prefix_precision, last_precision).argmax())


def test_sampling_is_reproducible_with_seed_and_top_k_one_is_greedy(tiny):
    prompt = prompts(1, 9)[0]
    seeded = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    first = pipeline(tiny).generate(prompt, seeded).token_ids
    again = pipeline(tiny).generate(prompt, seeded).token_ids
    other = pipeline(tiny).generate(prompt, SamplingParams(max_tokens=10, temperature=1.0, seed=99, ignore_eos=True))
    assert first == again
    assert other.token_ids != first
    top1 = pipeline(tiny).generate(prompt, SamplingParams(max_tokens=10, temperature=0.7, top_k=1, seed=5, ignore_eos=True))
    assert top1.token_ids == pipeline(tiny).generate(prompt, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)).token_ids


def test_stop_token_ids_and_length(tiny):
    prompt = prompts(1, 9)[0]
    free_run = pipeline(tiny).generate(prompt, GREEDY).token_ids
    stop_at = free_run[4]
    first = free_run.index(stop_at)
    stopped = pipeline(tiny).generate(prompt, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(stop_at,), ignore_eos=True))
    assert stopped.token_ids == free_run[:first] and stopped.finish_reason == "stop"
    assert pipeline(tiny).generate(prompt, GREEDY).finish_reason == "length"


def test_bad_requests_raise_and_leak_nothing(tiny):
    p = pipeline(tiny, num_kv_blocks=8, max_model_len=32)
    with pytest.raises(ValueError, match="exceed the maximum context length"):
        p.generate(list(range(30)), SamplingParams(max_tokens=8))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        p.generate([1, 2, 10**6], GREEDY)
    with pytest.raises(ValueError, match="at least one token"):
        p.generate([], GREEDY)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    assert p.decode.core.block_manager.num_free_blocks == 8
    assert p.prefill.core.block_manager.num_free_blocks == 8


def test_abort_frees_blocks(tiny):
    p = pipeline(tiny, local_prefill_tokens=10_000)
    p.start(prompts(1, 20)[0], GREEDY, request_id="x")
    p.decode.step()
    assert p.decode.core.block_manager.num_free_blocks < 64
    assert p.decode.abort("x")
    assert p.decode.core.block_manager.num_free_blocks == 64
    assert not p.decode.has_unfinished()


def test_prefill_lease_expiry_releases_blocks(tiny):
    p = pipeline(tiny, kv_lease_seconds=5.0)
    result = p.prefill.prefill("lease", prompts(1, 20)[0])
    assert p.prefill.pinned and p.prefill.core.block_manager.num_free_blocks == 64 - len(result.block_ids)
    import time

    assert p.prefill.expire_leases(time.monotonic()) == []
    assert p.prefill.expire_leases(time.monotonic() + 6.0) == ["lease"]
    assert p.prefill.core.block_manager.num_free_blocks == 64
