"""API keys, request limits and the HTTP surface, on the in-process Router (scripted worker, no Ray).

The same checks run on the real app in tests/cpu/test_faults.py (keys from a file, fuzzing).
"""

from __future__ import annotations

import dataclasses
import hmac
import json

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError

from mixquant_serve import config as config_module
from mixquant_serve.config import AppConfig
from mixquant_serve.protocol import GenerateRequest
from mixquant_serve.router import OpenAIServer, ServerSettings, build_fastapi_app
from mixquant_serve.security import ApiKeySource, ApiKeyVerifier, bearer_token, load_api_keys
from tests.cpu.test_router import MODEL, USER, CharTokenizer, ScriptedDecode

KEYS = ["sk-first-key", "sk-second-key"]
TRANSFER_FIELDS = ("agent_metadata", "metadata_version", "prefill_agent", "block_ids", "kv_transfer_params", "decode_agent")
EXPECTED_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/openapi.json"}


def keys_file(tmp_path) -> str:
    path = tmp_path / "keys.txt"
    path.write_text("# API keys, one a line\n\n" + "\n".join(KEYS) + "\n")
    return str(path)


def secured_client(tmp_path, **settings_fields) -> tuple[TestClient, ScriptedDecode]:
    settings = ServerSettings(
        model_name=MODEL, max_model_len=200, max_tokens_cap=64, max_body_bytes=4096,
        api_keys=ApiKeySource(keys_file=keys_file(tmp_path)), **settings_fields,
    )
    decode = ScriptedDecode()
    return TestClient(build_fastapi_app(OpenAIServer(CharTokenizer(), decode.generate, settings))), decode


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ---------------------------------------------------------------------------------------------- API keys


@pytest.mark.parametrize(
    "headers",
    [{}, bearer("sk-wrong"), bearer(KEYS[0] + "x"), bearer(KEYS[0][:-1]), {"Authorization": KEYS[0]},
     {"Authorization": f"Basic {KEYS[0]}"}, {"Authorization": "Bearer "}],
)
def test_requests_without_a_valid_key_are_401_in_openai_shape_and_never_reach_the_worker(tmp_path, headers):
    client, decode = secured_client(tmp_path)
    for method, path, body in (("POST", "/v1/chat/completions", {"model": MODEL, "messages": USER}),
                               ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi"}),
                               ("GET", "/v1/models", None)):
        response = client.request(method, path, json=body, headers=headers)
        assert response.status_code == 401, (path, response.text)
        error = response.json()["error"]
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        assert "Authorization: Bearer" in error["message"]
        assert response.headers["www-authenticate"] == "Bearer"
    assert decode.requests == []


def test_every_configured_key_is_accepted_and_health_stays_open(tmp_path):
    client, decode = secured_client(tmp_path)
    assert client.get("/health").status_code == 200
    for key in KEYS:
        response = client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER}, headers=bearer(key))
        assert response.status_code == 200, response.text
        assert client.get("/v1/models", headers={"authorization": f"bearer {key}"}).status_code == 200
    assert len(decode.requests) == 2


def test_the_key_is_checked_before_the_body_is_read(tmp_path):
    client, decode = secured_client(tmp_path)
    oversized = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 9000}]})
    response = client.post("/v1/chat/completions", content=oversized, headers={"content-type": "application/json"})
    assert response.status_code == 401  # not 413: an anonymous client cannot make the server read 4 MB
    response = client.post("/v1/chat/completions", content=oversized, headers={"content-type": "application/json", **bearer(KEYS[0])})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_keys_compare_in_constant_time_against_every_key(monkeypatch):
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    verifier = ApiKeyVerifier(KEYS)
    assert verifier.is_authorized(f"Bearer {KEYS[0]}")  # matches the first key, still compares with both
    assert len(calls) == 2 and all(len(a) == len(b) == 32 for a, b in calls)  # SHA-256 digests: no length leak
    calls.clear()
    assert not verifier.is_authorized("Bearer nope")
    assert len(calls) == 2


def test_keys_from_a_file_or_an_environment_variable_named_in_the_config(tmp_path, monkeypatch):
    assert load_api_keys(ApiKeySource(keys_file=keys_file(tmp_path))) == KEYS
    monkeypatch.setenv("MQ_TEST_API_KEYS", " sk-a , sk-b ,")
    assert load_api_keys(ApiKeySource(keys_env_var="MQ_TEST_API_KEYS")) == ["sk-a", "sk-b"]
    with pytest.raises(ValueError, match="MQ_TEST_UNSET"):
        load_api_keys(ApiKeySource(keys_env_var="MQ_TEST_UNSET"))
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no API keys"):
        load_api_keys(ApiKeySource(keys_file=str(tmp_path / "empty.txt")))
    with pytest.raises(ValueError, match="keys_file"):
        load_api_keys(ApiKeySource(keys_file=str(tmp_path / "missing.txt")))
    with pytest.raises(ValueError, match="exactly one"):
        ApiKeySource(keys_file="a", keys_env_var="B")
    assert bearer_token("BEARER tok") == "tok" and bearer_token("Bearer") is None and bearer_token(None) is None


def test_api_keys_config_is_typed_and_strict(tmp_path):
    config = AppConfig.model_validate({"router": {"api_keys": {"keys_env_var": "MQ_KEYS"}, "max_prompt_tokens": 100}})
    assert config.router.api_keys.keys_env_var == "MQ_KEYS" and config.router.max_prompt_tokens == 100
    for bad in ({"api_keys": {}}, {"api_keys": {"keys_file": "a", "keys_env_var": "B"}},
                {"api_keys": {"keys": ["sk-inline"]}}, {"max_prompt_tokens": 0}):
        with pytest.raises(ValidationError):
            AppConfig.model_validate({"router": bad})


def test_every_config_field_is_described():
    models = [value for value in vars(config_module).values()
              if isinstance(value, type) and issubclass(value, BaseModel) and value.__module__ == config_module.__name__]
    undescribed = [f"{m.__name__}.{name}" for m in models for name, field in m.model_fields.items() if not field.description]
    assert not undescribed


# ---------------------------------------------------------------------------------------------- limits


def test_prompt_limit_is_a_400_naming_the_field(tmp_path):
    client, decode = secured_client(tmp_path, max_prompt_tokens=40)
    ok = client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 40, "max_tokens": 2}, headers=bearer(KEYS[0]))
    assert ok.status_code == 200, ok.text
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 41}, headers=bearer(KEYS[0]))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "prompt" and error["code"] == "prompt_too_long" and "41 tokens" in error["message"]
    chat = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "y" * 40}]},
                       headers=bearer(KEYS[0]))
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"  # the template's tokens count too
    assert len(decode.requests) == 1


def test_max_tokens_cap_and_context_are_400(tmp_path):
    client, decode = secured_client(tmp_path)
    over_cap = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 65}, headers=bearer(KEYS[0]))
    assert over_cap.status_code == 400 and over_cap.json()["error"]["param"] == "max_tokens"
    over_context = client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 190, "max_tokens": 20}, headers=bearer(KEYS[0]))
    assert over_context.status_code == 400 and over_context.json()["error"]["code"] == "context_length_exceeded"
    assert decode.requests == []


# ---------------------------------------------------------------------------------------------- the HTTP surface


def test_no_route_accepts_transfer_metadata(tmp_path):
    client, decode = secured_client(tmp_path)
    app_paths = {route.path for route in client.app.routes}
    assert app_paths == EXPECTED_PATHS
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) == EXPECTED_PATHS - {"/openapi.json"}
    text = json.dumps(schema)
    assert not [name for name in TRANSFER_FIELDS if f'"{name}"' in text]
    # the only message the Router sends a worker carries ids, tokens and sampling: nothing a client could aim at NIXL
    assert {f.name for f in dataclasses.fields(GenerateRequest)} == {"request_id", "session_id", "prompt_token_ids", "sampling"}
    for name in TRANSFER_FIELDS:
        for path, body in (("/v1/chat/completions", {"model": MODEL, "messages": USER}), ("/v1/completions", {"model": MODEL, "prompt": "hi"})):
            response = client.post(path, json={**body, name: "TVFLVgEA"}, headers=bearer(KEYS[0]))
            assert response.status_code == 400 and response.json()["error"]["param"] == name, response.text
        extra_body = {"model": MODEL, "messages": USER, "extra_body": {name: "x"}}
        assert client.post("/v1/chat/completions", json=extra_body, headers=bearer(KEYS[0])).status_code == 400
    assert decode.requests == []


def test_openapi_schema_describes_the_request_bodies(tmp_path):
    client, _ = secured_client(tmp_path)
    schema = client.get("/openapi.json").json()
    chat = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert chat == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    properties = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"model", "messages", "max_tokens", "stream", "tools"} <= set(properties)
    assert "401" in schema["paths"]["/v1/completions"]["post"]["responses"]
