"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the right status.

Every error a user can cause is raised as ``APIError`` (or mapped to one here) so the body always
has the same shape, including pydantic's validation errors (400, not FastAPI's default 422).
A 500 never carries exception text (it is logged instead): it could reveal paths or internals.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error with an HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def overloaded(message: str, retry_after_s: int, *, status: int = 429, code: str = "overloaded") -> APIError:
    """429 (too much queued) or 503 (draining): the client may retry after ``retry_after_s`` seconds."""
    return APIError(status, message, code=code, headers={"Retry-After": str(retry_after_s)})


def error_body_json(status: int, message: str, *, code: str | None = None) -> bytes:
    """A complete error body, for the pure-ASGI middlewares that answer before FastAPI runs."""
    return json.dumps(APIError(status, message, code=code).body()).encode()


def _loc_to_param(loc: tuple) -> str | None:
    # ("body", "messages", 0, "content") -> "messages.0.content"
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            # loc is ("body", <character offset>): the offset is no parameter.
            reason = (first.get("ctx") or {}).get("error") or first.get("msg")
            at = first.get("loc", ())[-1]
            message = f"the request body is not valid JSON: {reason} (at character {at})"
            return APIError(400, message, param=None, code="invalid_json").response()
        param = _loc_to_param(tuple(first.get("loc", ())))
        detail = "; ".join(f"{_loc_to_param(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg')}" for e in errors[:5])
        return APIError(400, f"invalid request: {detail}", param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's 405 carries the Allow header in exc.headers.
        return APIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unhandled(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error while serving a request")
        return APIError(500, "internal error (logged on the server)", code="internal_error").response()
