"""The error objects and the handlers that turn every failure into one.

Every error the server sends is `{"error": {"message", "type", "param", "code"}}` (the
OpenAI shape) with a status the official SDKs map to their exceptions (400
BadRequestError, 401 AuthenticationError, 404 NotFoundError, 413, 429 RateLimitError,
503); on the Anthropic routes (/v1/messages...) it is Anthropic's
`{"type": "error", "error": {"type", "message"}}` with the same statuses.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("yun.server")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}
ANTHROPIC_PREFIX = "/v1/messages"  # /v1/messages and /v1/messages/count_tokens


def is_anthropic(path: str) -> bool:
    return path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/")


class APIError(Exception):
    """An error to send to the client as the OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)

    def anthropic_body(self) -> dict[str, Any]:
        kind = ANTHROPIC_TYPES.get(self.status, "api_error" if self.status >= 500
                                   else "invalid_request_error")
        message = self.message  # Anthropic's object has no param: name it in the message
        if self.param and not message.startswith(self.param):
            message = f"{self.param}: {message}"
        return {"type": "error", "error": {"type": kind, "message": message}}

    def body_for(self, path: str) -> dict[str, Any]:
        """The error object in the shape of the API that `path` belongs to."""
        return self.anthropic_body() if is_anthropic(path) else self.body()


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(err: APIError, path: str = "") -> JSONResponse:
    return JSONResponse(err.body_for(path), status_code=err.status, headers=err.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def param_of(loc: tuple[Any, ...]) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, str) and not _is_type_tag(p):
            out += ("." if out else "") + p
    return out or None


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "json-or-python"}


def _is_type_tag(part: str) -> bool:
    """pydantic names union members in error locations ('list[int]', 'ContentPart')."""
    return part in _TYPE_TAGS or "[" in part or "-" in part or part[:1].isupper()


def _validation_error(exc: RequestValidationError) -> APIError:
    """One clear message naming the field (`param`), from pydantic's list of errors."""
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request")
    if errors[0].get("type") == "json_invalid":
        why = (errors[0].get("ctx") or {}).get("error", "")
        return bad_request(f"the request body is not valid JSON ({why})".replace(" ()", ""))
    # A union reports one error per member: the deepest one names the real problem.
    first = max(errors, key=lambda e: len(param_of(tuple(e.get("loc", ()))) or ""))
    param = param_of(tuple(first.get("loc", ())))
    kind = first.get("type")
    if param is None:
        return bad_request("the request body is empty: send a JSON object" if kind == "missing"
                           else "the request body must be a JSON object")
    msg = "this field is required" if kind == "missing" else \
        str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    text = f"{param}: {msg}"
    others = {param_of(tuple(e.get("loc", ()))) for e in errors} - {param}
    if others:  # other fields (a union's members all report on the same one)
        text += f" (and {len(others)} more field{'s' if len(others) > 1 else ''} with problems)"
    return bad_request(text, param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(req: Request, exc: APIError) -> JSONResponse:
        return error_response(exc, req.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(req: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc), req.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = "no such route; see GET /v1/models and the OpenAI API paths"
        return error_response(APIError(exc.status_code, message,
                                       headers=getattr(exc, "headers", None)), req.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(req: Request, exc: Exception) -> JSONResponse:
        # Last resort: a bug. Bad input never gets here (the tests fuzz for it).
        log.exception("unexpected error while serving a request")
        return error_response(APIError(500, f"internal error: {type(exc).__name__}"),
                              req.url.path)
