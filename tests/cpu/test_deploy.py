"""deploy/kuberay/rayservice.yaml: a RayService the CRD accepts, whose Serve config our schema accepts,
and whose pools can only land on their own worker group."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mixquant_serve.config import AppConfig

RAYSERVICE = Path(__file__).resolve().parents[2] / "deploy" / "kuberay" / "rayservice.yaml"


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return yaml.safe_load(RAYSERVICE.read_text())


def group_resources(group: dict) -> dict[str, float]:
    """Custom resources a worker group advertises: rayStartParams.resources is a quoted JSON string."""
    raw = group["rayStartParams"].get("resources")
    return json.loads(json.loads(raw)) if raw else {}


def test_rayservice_carries_the_fields_the_crd_requires(rayservice):
    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    assert rayservice["metadata"]["name"]
    cluster = rayservice["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["template"]["spec"]["containers"][0]["image"]
    assert any(port["containerPort"] == 8000 for port in head["template"]["spec"]["containers"][0]["ports"])
    names = set()
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] not in names
        names.add(group["groupName"])
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert isinstance(group["rayStartParams"], dict)
        container = group["template"]["spec"]["containers"][0]
        assert container["name"] and container["image"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert names == {"prefill-gpu", "decode-gpu"}


def test_embedded_serve_config_validates_against_serve_and_our_schema(rayservice):
    from ray.serve.schema import ServeDeploySchema

    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))
    (app,) = serve_config.applications
    assert app.import_path == "mixquant_serve.app:build_app"
    assert app.autoscaling_policy["policy_function"] == "mixquant_serve.autoscaling:PoolRatioAutoscalingPolicy"
    config = AppConfig.model_validate(app.args)
    assert config.prefill.resources.num_gpus == 1 and config.decode.resources.num_gpus == 1


def test_each_pool_fits_only_its_own_worker_group(rayservice):
    from ray.serve.schema import ServeDeploySchema

    (app,) = ServeDeploySchema.model_validate(yaml.safe_load(rayservice["spec"]["serveConfigV2"])).applications
    config = AppConfig.model_validate(app.args)
    groups = {g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    for pool, own_group in ((config.prefill, "prefill-gpu"), (config.decode, "decode-gpu")):
        needs = pool.resources.custom
        assert needs, "a pool without a custom resource could land on any group"
        fits = [name for name, group in groups.items()
                if all(group_resources(group).get(key, 0) >= amount for key, amount in needs.items())]
        assert fits == [own_group]
        container = groups[own_group]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] >= pool.resources.num_gpus


def test_custom_resources_reach_the_replica_actor_options():
    from mixquant_serve.app import _actor_options

    assert _actor_options(4, 1, {"prefill_node": 1}) == {"num_cpus": 4, "num_gpus": 1, "resources": {"prefill_node": 1}}
    assert _actor_options(0.5, 0) == {"num_cpus": 0.5, "num_gpus": 0}
