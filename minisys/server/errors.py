"""Errors in OpenAI's JSON shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the client can cause is a 400 with a message that says what
to change (a validation error from pydantic, a ValueError from
`SamplingParams` or from the engine's `add_request`); an unknown model is a
404, a missing or wrong API key a 401, a body over ``--max-body-bytes`` a
413, a full queue a 429 (`limits`), a body or head that does not arrive in
time a 408 (`timeouts`), a request during shutdown a 503 (`shutdown`).
Nothing else leaks: a request refused here never entered the engine. The
OpenAPI document lists these per route (`openapi`).

A failure of the server itself (a bug, an engine step that raised) is a 500
whose body has a generic message and an error id, never the exception's
text; the log (logger ``minisys.server``) has the traceback under the same
id (`internal_error_body`).
"""
from __future__ import annotations

import logging
import uuid
from http import HTTPStatus
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class OpenAIError(Exception):
    """An error to return to the client as-is."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code


logger = logging.getLogger("minisys.server")


def new_error_id() -> str:
    return f"err-{uuid.uuid4().hex[:16]}"


def internal_error_body(exc: BaseException, context: str) -> dict:
    """A 500's body for ``exc``: a generic message + an error id, no exception text.

    The traceback is logged under the id here, unless ``exc`` already carries
    an ``error_id`` (it was logged where it was raised, e.g. a failed engine
    step shared by many requests): one log entry per failure.
    """
    error_id = getattr(exc, "error_id", None)
    if error_id is None:
        error_id = new_error_id()
        logger.error("%s (error id %s)", context, error_id, exc_info=exc)
    body = error_body(f"internal server error (error id {error_id}): the server log has the details",
                      "internal_error")
    body["error"]["error_id"] = error_id
    return body


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Any = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(err: OpenAIError) -> JSONResponse:
    return JSONResponse(error_body(err.message, err.type, err.param, err.code), status_code=err.status)


def _validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    """One line per pydantic error: ``field.path: what is wrong``; and the first field's name."""
    lines, param = [], None
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        if param is None and loc:
            param = loc[0]
        if e.get("type") == "json_invalid":
            param = None
            lines.append(f"the body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
        elif e.get("type") == "extra_forbidden":
            lines.append(f"{where}: minisys does not implement this field (it is refused rather than ignored)")
        elif not loc and e.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            lines.append("the body must be a JSON object")
        else:
            lines.append(f"{where or 'body'}: {e.get('msg')}")
    return "; ".join(dict.fromkeys(lines)) or "invalid request", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return JSONResponse(error_body(message, kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))      # 405 keeps its Allow header

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(internal_error_body(exc, f"unhandled error in {request.method} {request.url.path}"),
                            status_code=500)
