"""The CPU default app as the tests deploy it, and where Serve listens (shared by tests/conftest.py and test modules)."""

from __future__ import annotations

import socket
from pathlib import Path

from mixquant_serve.config import AppConfig

BUNDLED = "bundled:smollm2-135m-instruct"


def _free_port() -> int:
    """A port nobody listens on now: concurrent test sessions on one machine must not share Serve's port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


SERVE_PORT = _free_port()  # once per test process
SERVE_BASE = f"http://127.0.0.1:{SERVE_PORT}"
DEFAULT_ENGINE = {"block_size": 16, "num_kv_blocks": 512, "max_num_batched_tokens": 2048}
DEFAULT_LOCAL_PREFILL_TOKENS = 64


def default_app_config(cache_dir: Path | str, **overrides) -> AppConfig:
    """The CPU default app as tests run it: one replica per pool, small fractional CPUs."""
    config = {
        "model": BUNDLED,
        "device": "cpu",
        "model_cache_dir": str(cache_dir),
        "prefill": {
            "precision": "nvfp4",
            "resources": {"num_cpus": 0.5},
            "autoscaling": {"min_replicas": 1, "max_replicas": 1},
            "engine": {**DEFAULT_ENGINE, "max_num_seqs": 4},
        },
        "decode": {
            "local_prefill_tokens": DEFAULT_LOCAL_PREFILL_TOKENS,
            "resources": {"num_cpus": 0.5},
            "autoscaling": {"min_replicas": 1, "max_replicas": 1},
            "engine": DEFAULT_ENGINE,
        },
        "router": {"num_cpus": 0.1},
    }
    for key, value in overrides.items():
        config[key] = value
    return AppConfig.model_validate(config)
