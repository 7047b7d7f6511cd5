"""Every failure as OpenAI's error JSON, `{"error": {"message", "type", "param", "code"}}`, with the right status.

A client's mistake is a 4xx (the official client retries 5xx, so a bad request must never be one); a full queue is
a 503 with Retry-After; anything unexpected is a 500 whose body says nothing about the code (the traceback goes to
the server log).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from idefix.errors import ContextLengthError, IdefixError, ImageError, InvalidRequestError, OverloadedError

log = logging.getLogger("idefix.server")

RETRY_AFTER_SECONDS = 1


class APIError(Exception):
    """An error answer, raised anywhere in a request's handling."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_exception(exc: BaseException) -> APIError:
    """The answer to an exception raised while handling a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValidationError):
        return from_validation(exc.errors(include_url=False))
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, ImageError):
        return APIError(400, str(exc), param="messages", code="invalid_image")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=_param_of(str(exc)), code="invalid_value")
    if isinstance(exc, OverloadedError):
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        return APIError(503, str(exc), type="server_overloaded", code="overloaded", headers=headers)
    if isinstance(exc, IdefixError):  # e.g. the engine shut down under the request
        return APIError(503, str(exc), type="server_error", code="unavailable")
    log.error("internal error while handling a request", exc_info=exc)
    return APIError(500, "internal server error", type="server_error", code="internal_error")


def from_validation(errors: list[Any]) -> APIError:
    """A 400 naming the field pydantic refused (never FastAPI's default 422 shape). Of a union's alternatives
    the deepest failure is the informative one ("content[0].image_url.url: Field required", not "not a string")."""
    if not errors:
        return APIError(400, "invalid request body", code="invalid_value")
    if errors[0].get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {errors[0].get('msg')}", code="invalid_json")
    depth = max(len(error.get("loc", ())) for error in errors)
    deepest = [error for error in errors if len(error.get("loc", ())) == depth]
    param = _param(deepest[0].get("loc", ()))
    problems = dict.fromkeys(str(error.get("msg")) for error in errors if _param(error.get("loc", ())) == param)
    where = f"{param}: " if param else "request body: "
    return APIError(400, where + "; or ".join(problems), param=param, code="invalid_value")


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "dict", "list"})
_PART_TAGS = frozenset({"text", "image_url"})  # discriminator values pydantic puts in the location of a content part


def _param(loc: tuple[Any, ...]) -> str | None:
    """pydantic's error location as a field path, `messages[0].content[1].image_url.url`, without union member names."""
    path = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _union_member(loc, i):
            path += f".{part}" if path else part
    return path or None


def _union_member(loc: tuple[Any, ...], i: int) -> bool:
    part = loc[i]
    if part == "body" or "[" in part or part in _TYPE_NAMES or part[:1].isupper():
        return True
    return bool(i) and isinstance(loc[i - 1], int) and part in _PART_TAGS and i + 1 < len(loc)


def _param_of(message: str) -> str | None:
    """The field an InvalidRequestError's message starts with ("top_p=2 is out of range" -> "top_p")."""
    head = message.split(" ", 1)[0].split("=", 1)[0].rstrip(":")
    return head if head.replace("_", "").replace(".", "").replace("[", "").replace("]", "").isalnum() else None


def install(app: FastAPI) -> None:
    """Route every error FastAPI / Starlette can produce through `APIError`."""

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        return from_exception(exc).response()

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
            return APIError(404, message, code="unknown_url").response()
        if exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
            return APIError(405, message, code="method_not_allowed", headers=exc.headers).response()
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers).response()

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return from_validation(list(exc.errors())).response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(IdefixError, api_error)
    app.add_exception_handler(ValidationError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, api_error)
