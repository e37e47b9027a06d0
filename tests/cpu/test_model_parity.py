"""The bundled SmolLM2-135M-Instruct through our engine equals transformers on the same weights."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mixquant_serve.engine.build import build_local_pipeline
from mixquant_serve.engine.config import EngineConfig
from mixquant_serve.engine.kv_cache import allocate_kv_cache
from mixquant_serve.engine.sampling import SamplingParams
from mixquant_serve.model.attention import AttentionMetadata
from mixquant_serve.model.checkpoint import open_checkpoint

BUNDLED = "bundled:smollm2-135m-instruct"

CPU = torch.device("cpu")
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers greater than 10.",
    "Explain in one sentence what a tool call is for an AI agent.",
    "Translate 'good morning' into Spanish.",
]


@pytest.fixture(scope="module")
def hf_model(bundled, model_cache_dir):
    from transformers import AutoModelForCausalLM

    folder = open_checkpoint(BUNDLED, cache_dir=model_cache_dir, progress=False).tokenizer_dir
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()


def chat_ids(bundled, prompt: str) -> list[int]:
    return bundled.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])


def our_logits(model, ids: list[int]) -> torch.Tensor:
    block_size = 16
    num_blocks = -(-len(ids) // block_size)
    cache = allocate_kv_cache(model.config, num_blocks, block_size, torch.float32, CPU)
    positions = torch.arange(len(ids))
    meta = AttentionMetadata(
        [len(ids)], [len(ids)], [list(range(num_blocks))], positions // block_size, positions % block_size, block_size
    )
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), positions, cache, meta, "bf16"))


def test_logits_match_transformers_forward(bundled, hf_model):
    for prompt in CHAT_PROMPTS[:2]:
        ids = chat_ids(bundled, prompt)
        ours = our_logits(bundled.model, ids)
        with torch.inference_mode():
            theirs = hf_model(torch.tensor([ids])).logits[0].float()
        diff = (ours - theirs).abs()
        assert diff.max() < 2e-3, f"max |logit diff| {diff.max():.2e} at {divmod(int(diff.argmax()), diff.shape[1])}"
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_greedy_generation_matches_transformers_generate(bundled, hf_model):
    pipeline, _ = build_local_pipeline(BUNDLED, "bf16", CPU, EngineConfig(), 0, loaded=bundled)
    eos = set(bundled.tokenizer.eos_token_ids)
    for prompt in CHAT_PROMPTS:
        ids = chat_ids(bundled, prompt)
        ours = pipeline.generate(ids, SamplingParams(max_tokens=32, temperature=0.0))
        assert ours.report.prefill == "remote"  # bf16 prefill engine, KV handed to the decoder
        with torch.inference_mode():
            out = hf_model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=32, do_sample=False, eos_token_id=sorted(eos), pad_token_id=sorted(eos)[0],
            )
        theirs = [t for t in out[0, len(ids):].tolist()]
        while theirs and theirs[-1] in eos:  # transformers keeps the eos token and pads after it
            theirs.pop()
        assert ours.token_ids == theirs, prompt
        assert ours.text == bundled.tokenizer.decode(theirs)


def test_generate_command_prints_only_the_text(bundled, hf_model, model_cache_dir):
    """`mixquant generate` end to end, bf16 (fp32 compute) and nvfp4 prefill."""
    env_cache = {"XDG_CACHE_HOME": str(model_cache_dir.parent / "xdg")}
    import os
    import shutil

    # reuse the session's converted model: point the CLI's default cache at a copy of it
    target = model_cache_dir.parent / "xdg" / "mixquant"
    if not target.exists():
        shutil.copytree(model_cache_dir, target)
    prompt = CHAT_PROMPTS[0]
    ids = chat_ids(bundled, prompt)
    pipeline, _ = build_local_pipeline(BUNDLED, "bf16", CPU, EngineConfig(), 0, loaded=bundled)
    expected = pipeline.generate(ids, SamplingParams(max_tokens=16, temperature=0.0)).text

    def run(precision: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "mixquant_serve.cli", "generate", "--prompt", prompt, "--max-tokens", "16",
             "--prefill-precision", precision, "--temperature", "0", "--device", "cpu"],
            capture_output=True, text=True, env={**os.environ, **env_cache}, timeout=300,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert run("bf16") == expected + "\n"
    quantized = run("nvfp4")
    assert quantized.strip(), "nvfp4 prefill produced no text"


def test_shared_long_prefix_is_reused_with_the_same_greedy_output(bundled):
    """Two turns of one agent: the second reuses the first's blocks on both pools, output unchanged."""
    tool_result = " ".join(f"row {i}: sensor-{i % 7} reads {i * 13 % 101} degrees;" for i in range(40))
    history = [
        {"role": "system", "content": "You are a monitoring agent. Answer briefly."},
        {"role": "user", "content": f"Tool output:\n{tool_result}"},
    ]
    first = chat_ids(bundled, "x")  # warm nothing: a different prompt
    turn1 = bundled.tokenizer.apply_chat_template(history + [{"role": "user", "content": "Which sensor reads 0?"}])
    turn2 = bundled.tokenizer.apply_chat_template(history + [{"role": "user", "content": "What does row 3 read?"}])
    greedy = SamplingParams(max_tokens=12, temperature=0.0)

    cold, _ = build_local_pipeline(BUNDLED, "nvfp4", CPU, EngineConfig(), 0, loaded=bundled)
    expected = cold.generate(turn2, greedy)
    assert expected.report.cached_tokens_decode == 0 and expected.report.cached_tokens_prefill == 0

    warm, _ = build_local_pipeline(BUNDLED, "nvfp4", CPU, EngineConfig(), 0, loaded=bundled)
    warm.generate(first, greedy)
    warm.generate(turn1, greedy)
    again = warm.generate(turn2, greedy)
    shared = next(i for i, (a, b) in enumerate(zip(turn1, turn2)) if a != b)
    assert shared > 400
    assert again.report.cached_tokens_decode == shared // 16 * 16
    assert again.report.cached_tokens_prefill == shared // 16 * 16
    assert again.token_ids == expected.token_ids
