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
