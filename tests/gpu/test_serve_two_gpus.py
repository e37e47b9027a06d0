"""The shipped GPU serve config on a two-GPU machine: each pool on its own GPU, KV over NIXL (VRAM),
greedy output equal to the one-process pipeline's, token for token.

`deploy/serve_config.gpu.yaml` is deployed through the Serve controller's config path (what
`serve run deploy/serve_config.gpu.yaml` calls) with only the HTTP port and model cache changed.
Two turns of one session go through /v1/completions with token ids (the synthetic 8B model has no
tokenizer): both must be prefilled remotely in fp8 on one GPU, pulled by the decode replica on the
other (the second turn pulls only its new blocks), and produce exactly the tokens that the
single-process pipeline (same engines, in-process KV hand-off) produces afterwards on one GPU.
Needs Ray and NIXL (the device bundle) and two GPUs; skipped otherwise.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from tests.app_config import SERVE_PORT

pytestmark = [
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (one per pool)"),
    pytest.mark.timeout(1200),
]
REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "deploy" / "serve_config.gpu.yaml"
TURN_TOKENS = (1500, 700)  # new tokens per turn: both above the config's local_prefill_tokens, so both go remote
MAX_TOKENS = 24


def gpus_with_processes() -> set[str]:
    """UUIDs of the GPUs that some process computes on (nvidia-smi's view, across processes)."""
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=gpu_uuid", "--format=csv,noheader"],
                         capture_output=True, text=True, check=True).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def test_shipped_gpu_config_splits_the_pools_over_two_gpus_and_matches_the_pipeline(tmp_path):
    ray = pytest.importorskip("ray")
    pytest.importorskip("nixl")
    httpx = pytest.importorskip("httpx")
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from mixquant_serve.app import wait_until_running
    from mixquant_serve.config import AppConfig
    from mixquant_serve.engine.build import build_local_pipeline
    from mixquant_serve.engine.config import EngineConfig
    from mixquant_serve.engine.sampling import SamplingParams

    config = yaml.safe_load(CONFIG.read_text())
    port = SERVE_PORT
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    app = config["applications"][0]
    app["args"]["model_cache_dir"] = str(tmp_path)
    args = AppConfig.model_validate(app["args"])
    assert min(TURN_TOKENS) > args.decode.local_prefill_tokens
    rng = random.Random(0)
    turns = [[rng.randrange(256, 128000) for _ in range(n)] for n in TURN_TOKENS]
    before = gpus_with_processes()

    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
        wait_until_running(app["name"], timeout_s=900)
        busy = gpus_with_processes() - before
        assert len(busy) == 2, f"expected the two pools on two GPUs, processes run on {busy}"
        served, stats, prompt = [], [], []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            model = client.get("/v1/models").json()["data"][0]["id"]
            for new_tokens in turns:
                prompt = prompt + new_tokens
                body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                        "ignore_eos": True, "return_token_ids": True}
                response = client.post("/v1/completions", json=body, headers={"x-session-id": "gpu-test"})
                assert response.status_code == 200, response.text
                served.append(response.json()["choices"][0]["token_ids"])
                stats.append(response.json()["mixquant"])
                prompt = prompt + served[-1]
        serve.delete(app["name"])
    finally:
        serve.shutdown()
        ray.shutdown()

    for turn in stats:
        assert turn["prefill"] == "remote" and turn["prefill_precision"] == "fp8", turn
        assert turn["kv_transfer_bytes"] > 0 and turn["fallback_reason"] is None, turn
    first_blocks, second_blocks = (s["kv_transfer_bytes"] for s in stats)
    assert second_blocks < first_blocks  # the second turn pulls only the blocks the decode replica lacks
    assert all(len(tokens) == MAX_TOKENS for tokens in served)

    engine = EngineConfig(block_size=args.decode.engine.block_size, num_kv_blocks=1024,
                          max_num_seqs=args.decode.engine.max_num_seqs,
                          max_num_batched_tokens=args.decode.engine.max_num_batched_tokens)
    pipeline, _ = build_local_pipeline(args.model, "fp8", torch.device("cuda:0"), engine,
                                       args.decode.local_prefill_tokens, cache_dir=tmp_path)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    prompt, expected = [], []
    for new_tokens in turns:
        prompt = prompt + new_tokens
        expected.append(pipeline.generate(prompt, greedy).token_ids)
        prompt = prompt + expected[-1]
    assert served == expected
