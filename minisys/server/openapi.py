"""The OpenAPI document tells the truth: request bodies, success bodies and every error a route returns.

The POST routes parse their bodies themselves (in a worker thread, see
`app`), so FastAPI cannot see their request models; `install_openapi` puts
them back (``requestBody`` with the pydantic model's JSON schema, shared
definitions under ``components/schemas``). Each route declares its error
statuses with the OpenAI error shape (`ErrorResponse`) through
`error_responses`, and the /v1 routes (and /metrics unless open) declare
the bearer key when the server has one. Generated clients and fuzzers
(schemathesis, in ``tests/test_server_hostile.py``) read this document:
a status or body the server returns but the document does not list is a
bug, found there.
"""
from __future__ import annotations

from typing import Any, Optional

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

ERROR_STATUSES: dict[int, str] = {
    400: "Invalid request: the message says what to change, `param` names the field",
    401: "Missing or wrong API key (`Authorization: Bearer KEY`)",
    404: "Unknown model (`param` is `model`)",
    413: "Request body over --max-body-bytes",
    429: "The server's queue is full (a limit named in the message): retry later",
    500: "A server failure: a generic message and an `error_id` for the log",
    503: "The server is shutting down (or its engine loop stopped): retry elsewhere or later",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Any] = None
    error_id: Optional[str] = None          # only on 500s (the log has the traceback under it)


class ErrorResponse(BaseModel):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


ERROR_SCHEMA_REF = "#/components/schemas/ErrorResponse"


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route decorator: each status with its description and `ErrorResponse`, always
    as JSON (FastAPI would give a ``"model"`` the route's media type: text/plain on /metrics)."""
    return {s: {"description": ERROR_STATUSES[s],
                "content": {"application/json": {"schema": {"$ref": ERROR_SCHEMA_REF}}}} for s in statuses}


SSE_EVENT = {"type": "object", "required": ["data"], "description": "one server-sent event",
             "properties": {"data": {"type": "string", "description": "a JSON chunk (or error); `[DONE]` last"},
                            "event": {"type": "string"}}}


def json_response(model: type[BaseModel], description: str, stream: bool = False) -> dict[int | str, dict]:
    """``responses=`` for a 200 whose JSON body is ``model`` (and an SSE stream when ``stream``)."""
    content: dict[str, Any] = {}
    if stream:     # OpenAPI 3.1 (before 3.2's itemSchema): an SSE media type's schema describes one event
        content["text/event-stream"] = {"schema": SSE_EVENT, "description": "server-sent events when `stream` is true"}
    return {200: {"model": model, "description": description, "content": content}}


def _add_schema(schemas: dict[str, Any], model: type[BaseModel]) -> None:
    """``model``'s JSON schema (and the models it uses) into ``components/schemas``."""
    js = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(js.pop("$defs", {}))
    schemas[model.__name__] = js


def install_openapi(app: FastAPI, bodies: dict[str, type[BaseModel]], secured: tuple[str, ...]) -> None:
    """Build ``app``'s OpenAPI document once, with ``bodies`` ({POST path: request model}) as required JSON
    request bodies and bearer auth on the paths that start with one of ``secured`` (none: no key)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description,
                          routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        _add_schema(schemas, ErrorResponse)          # referenced by `error_responses`
        for path, model in bodies.items():
            _add_schema(schemas, model)
            doc["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        if secured:
            doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, ops in doc["paths"].items():
                if path.startswith(secured):
                    for op in ops.values():
                        op["security"] = [{"bearer": []}]
        app.openapi_schema = doc
        return doc

    app.openapi = openapi       # type: ignore[method-assign]
