"""Co-located serving (`prefill.enabled: false`): no prefill pool; the decode replica prefills every
prompt itself. The baseline that benchmarks/agentic.py measures disaggregation against."""

from __future__ import annotations

import httpx
import pytest

from mixquant_serve.config import AppConfig
from tests.app_config import SERVE_BASE, default_app_config

APP, PREFIX = "colocated", "/colocated"
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def colocated_app(ray_serve, model_cache_dir, bundled):
    from mixquant_serve.app import build_app

    base = default_app_config(model_cache_dir).model_dump()
    base["prefill"]["enabled"] = False
    ray_serve.run(build_app(AppConfig.model_validate(base)), name=APP, route_prefix=PREFIX)
    yield f"{SERVE_BASE}{PREFIX}"
    ray_serve.delete(APP)


def test_without_a_prefill_pool_every_prompt_is_prefilled_by_the_decode_replica(colocated_app, ray_serve):
    deployments = ray_serve.status().applications[APP].deployments
    assert "PrefillWorker" not in deployments and "DecodeWorker" in deployments
    long_prompt = "Summarize: " + " ".join(f"item{i}" for i in range(200))  # far above local_prefill_tokens
    body = {"model": MODEL, "prompt": long_prompt, "max_tokens": 4, "temperature": 0}
    response = httpx.post(f"{colocated_app}/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    stats = response.json()["mixquant"]
    assert stats["prefill"] == "local" and stats["fallback_reason"] is None and stats["kv_transfer_bytes"] == 0
    loads = httpx.get(f"{colocated_app}/stats", timeout=60).json()
    assert set(loads) == {"decode"} and loads["decode"]["remote_prefills"] == 0 and loads["decode"]["fallbacks"] == 0


def test_agentic_benchmark_setups_are_valid_app_configs():
    from benchmarks.agentic import SETUPS, app_args, parse_args

    args = parse_args(["run", "--setup", "disagg-fp8", "--out", "x.json"])
    configs = {setup: AppConfig.model_validate(app_args(setup, args)) for setup in SETUPS}
    assert configs["disagg-fp8"].prefill.precision == "fp8" and configs["disagg-bf16"].prefill.precision == "bf16"
    colocated = configs["colocated-bf16"]
    assert not colocated.prefill.enabled and colocated.decode.autoscaling.min_replicas == 2
    assert all(c.decode.resources.num_gpus == 1 for c in configs.values())
