"""The shipped serve config, deployed as `serve run serve_config.yaml` deploys it, autoscales the prefill pool.

`serve_config.yaml` is read, validated (Serve's schema and our AppConfig), then deployed through the
Serve controller's config path (`deploy_apps`, what `serve run <config>` calls), so the
application-level `PoolRatioAutoscalingPolicy` named in the file is the policy in charge. Only the
test-specific fields change: app name and route prefix, the model cache, small CPU shares, and
short autoscaling windows (prefill may grow to 2 replicas, decode too: the test checks it does not).

Load: long prompts that share nothing (every token must be prefilled remotely), max_tokens 1, from
several client threads. The prefill pool must grow 1 -> 2 while decode stays at 1, then shrink back
to 1 once the load stops. Every request must succeed.
"""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from mixquant_serve.config import AppConfig
from tests.app_config import SERVE_BASE, SERVE_PORT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # three replicas start; minutes on a busy 2-core machine
REPO = Path(__file__).resolve().parents[2]
APP = "autoscale"
PREFIX = f"/{APP}"
MODEL = "smollm2-135m-instruct"
WORDS = ("amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "krypton",
         "lagoon", "meadow", "nickel", "onyx", "prairie", "quartz", "raven", "sierra", "tundra", "umber", "violet")
PROMPT_WORDS = 500  # ~1,000 tokens: far above local_prefill_tokens, so prefill is remote
CLIENTS = 6
SCALE_UP_TIMEOUT_S = 300
SCALE_DOWN_TIMEOUT_S = 240


def shipped_config() -> dict:
    return yaml.safe_load((REPO / "serve_config.yaml").read_text())


def test_shipped_serve_configs_validate():
    from ray.serve.schema import ServeDeploySchema

    for path in (REPO / "serve_config.yaml", REPO / "deploy" / "serve_config.gpu.yaml"):
        schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
        for app in schema.applications:
            AppConfig.model_validate(app.args)
            assert app.autoscaling_policy["policy_function"] == "mixquant_serve.autoscaling:PoolRatioAutoscalingPolicy"


def autoscaling_config(model_cache_dir) -> dict:
    config = shipped_config()
    config["http_options"] = {"host": "127.0.0.1", "port": SERVE_PORT}
    app = copy.deepcopy(config["applications"][0])
    app.update(name=APP, route_prefix=PREFIX)
    args = app["args"]
    args["model_cache_dir"] = str(model_cache_dir)
    windows = {"upscale_delay_s": 0.0, "downscale_delay_s": 4.0, "look_back_period_s": 4.0}
    args["prefill"].update(
        resources={"num_cpus": 0.3, "num_gpus": 0},
        autoscaling={"min_replicas": 1, "max_replicas": 2, **windows},
        target_queued_tokens_per_replica=600,
    )
    args["decode"].update(resources={"num_cpus": 0.3, "num_gpus": 0}, autoscaling={"min_replicas": 1, "max_replicas": 2, **windows})
    AppConfig.model_validate(args)
    config["applications"] = [app]
    return config


def running_replicas() -> dict[str, int]:
    from ray import serve

    deployments = serve.status().applications[APP].deployments
    return {name: deployments[name].replica_states.get("RUNNING", 0) for name in ("PrefillWorker", "DecodeWorker")}


@pytest.fixture(scope="module")
def autoscaling_app(ray_serve, model_cache_dir, bundled):
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from mixquant_serve.app import wait_until_running

    client = _get_global_client()
    client.deploy_apps(ServeDeploySchema.model_validate(autoscaling_config(model_cache_dir)))
    try:
        wait_until_running(APP, timeout_s=300)
        yield f"{SERVE_BASE}{PREFIX}"
    finally:
        ray_serve.delete(APP)


def long_prompt(client_index: int, request_index: int) -> str:
    """Words that differ from the first token on, so no two requests share a cached block."""
    offset = client_index * 7919 + request_index * 104729
    words = [WORDS[(offset + i * (i + client_index + 3)) % len(WORDS)] for i in range(PROMPT_WORDS)]
    return f"Log {client_index}-{request_index}: " + " ".join(words)


def test_prefill_pool_grows_under_long_prompts_and_shrinks_after(autoscaling_app):
    stop = threading.Event()
    failures: list[str] = []
    completed = [0] * CLIENTS

    def client(index: int) -> None:
        with httpx.Client(base_url=autoscaling_app, timeout=300) as http:
            request_index = 0
            while not stop.is_set():
                body = {"model": MODEL, "prompt": long_prompt(index, request_index), "max_tokens": 1, "temperature": 0}
                response = http.post("/v1/completions", json=body)
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text[:200]}")
                    return
                completed[index] += 1
                request_index += 1

    assert running_replicas() == {"PrefillWorker": 1, "DecodeWorker": 1}
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    most_decode, deadline = 1, time.monotonic() + SCALE_UP_TIMEOUT_S
    try:
        while True:
            replicas = running_replicas()
            most_decode = max(most_decode, replicas["DecodeWorker"])
            if replicas["PrefillWorker"] == 2:
                break
            assert not failures, failures
            assert time.monotonic() < deadline, f"prefill pool did not grow in {SCALE_UP_TIMEOUT_S} s: {replicas}"
            time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=300)
    assert not failures, failures
    assert sum(completed) > 0

    deadline = time.monotonic() + SCALE_DOWN_TIMEOUT_S
    while (replicas := running_replicas())["PrefillWorker"] != 1:
        most_decode = max(most_decode, replicas["DecodeWorker"])
        assert time.monotonic() < deadline, f"prefill pool did not shrink in {SCALE_DOWN_TIMEOUT_S} s: {replicas}"
        time.sleep(1)
    assert most_decode == 1, "the decode pool grew although its load (one token per request) never asked for it"
