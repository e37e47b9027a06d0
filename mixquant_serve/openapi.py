"""The Router's OpenAPI document, with the request bodies of api.py's models.

The handlers take the raw `Request` (they read the body themselves, to enforce the size limit
before parsing and to answer 400 with OpenAI's error body), so FastAPI cannot infer the bodies:

    GET /openapi.json ─▶ FastAPI's document for the routes
                         + requestBody of POST /v1/chat/completions = ChatCompletionRequest
                         + requestBody of POST /v1/completions      = CompletionRequest
                         + the models' JSON schemas under components.schemas

Clients and fuzzers (schemathesis, tests/cpu/test_faults.py) read it; it lists every HTTP route,
and none of them takes transfer metadata.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from mixquant_serve.api import ChatCompletionRequest, CompletionRequest, ErrorResponse

REQUEST_BODIES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
}
ERROR_STATUSES = {"400": "Invalid request", "401": "Missing or unknown API key", "413": "Body too large",
                  "503": "Generation failed"}
REF_TEMPLATE = "#/components/schemas/{model}"


def install_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` (served at /openapi.json) describe the request bodies; call after adding routes."""
    fastapi_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = fastapi_openapi()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        add_model_schema(components, ErrorResponse)
        for path, model in REQUEST_BODIES.items():
            operation = schema["paths"].get(path, {}).get("post")
            if operation is None:
                continue
            add_model_schema(components, model)
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": REF_TEMPLATE.format(model=model.__name__)}}},
            }
            for status, description in ERROR_STATUSES.items():
                operation["responses"][status] = {
                    "description": description,
                    "content": {"application/json": {"schema": {"$ref": REF_TEMPLATE.format(model="ErrorResponse")}}},
                }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def add_model_schema(components: dict[str, Any], model: type[BaseModel]) -> None:
    body = model.model_json_schema(ref_template=REF_TEMPLATE)
    components.update(body.pop("$defs", {}))
    components[model.__name__] = body
