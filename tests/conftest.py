"""Shared fixtures: the bundled model is converted once per session into a temporary cache folder."""

from __future__ import annotations

import pytest
import torch

BUNDLED = "bundled:smollm2-135m-instruct"


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mixquant-cache")


@pytest.fixture(scope="session")
def bundled(model_cache_dir):
    """SmolLM2-135M-Instruct prepared for both phases of the CPU default: nvfp4 and fp8 prefill, fp32 decode."""
    from mixquant_serve.model.loader import load_model

    torch.manual_seed(0)
    return load_model(BUNDLED, torch.device("cpu"), torch.float32, {"bf16", "nvfp4", "fp8"}, cache_dir=model_cache_dir, progress=False)


# ---- one Ray cluster and one Serve instance for every test that needs them ---------------------------
# Starting Ray costs seconds and starting the real app (two model replicas) a minute or more on 2 cores,
# so tests share them: `ray_serve` starts Ray + Serve (HTTP on SERVE_PORT) once per session, modules
# deploy their own applications under a unique name and route prefix and delete them when done, and
# `default_app` is the CPU default app (NVFP4 prefill pool, precise decode pool, real NIXL) at "/".

@pytest.fixture(scope="session")
def ray_serve():
    ray = pytest.importorskip("ray")
    from ray import serve

    from tests.app_config import SERVE_PORT

    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": SERVE_PORT})
    yield serve
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def default_app(ray_serve, model_cache_dir, bundled):
    """The default app at SERVE_BASE (route prefix "/"); yields the base URL."""
    from mixquant_serve.app import build_app
    from tests.app_config import SERVE_BASE, default_app_config

    ray_serve.run(build_app(default_app_config(model_cache_dir)), name="mixquant", route_prefix="/")
    yield SERVE_BASE
    ray_serve.delete("mixquant")
