"""Regressions for what fuzzing the Router found (benchmarks/fuzz_router.py); each one was a 503 before its fix."""

from __future__ import annotations

import pytest
import torch

from mixquant_serve.engine.sampling import SamplingParams, make_sampler_state, sample


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=1, temperature=1.0, top_p=5e-324),  # found by schemathesis: below fp32's range
        SamplingParams(max_tokens=1, temperature=1e-300, top_p=1.0),  # logits / temperature overflowed to inf
        SamplingParams(max_tokens=1, temperature=5e-324, top_p=1e-45, top_k=3),
    ],
)
def test_extreme_but_valid_sampling_parameters_sample_the_top_token(params):
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    logits[1, 7] = float("-inf")
    states = [make_sampler_state(params, torch.device("cpu")) for _ in range(2)]
    tokens = sample(logits, [params, params], states)
    assert tokens == logits.argmax(dim=-1).tolist()
