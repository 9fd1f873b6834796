"""Pure-ASGI middleware: count requests by status, check the API key, cap body size,
echo X-Request-Id.

They run before FastAPI reads the body, so an unauthenticated or oversized request is
refused without parsing it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from typing import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from yun.server.errors import APIError


async def send_error(send: Send, err: APIError, path: str = "") -> None:
    body = json.dumps(err.body_for(path)).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (err.headers or {}).items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestCounter:
    """Counts HTTP requests by route and status code (unknown paths count as "other")."""

    def __init__(self, app: ASGIApp, count: Callable[[str, int], None], routes: set[str]):
        self.app, self.count, self.routes = app, count, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # if the app dies before starting a response

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            path = scope.get("path", "")
            self.count(path if path in self.routes else "other", status)


class ApiKeyAuth:
    """401 unless one of the keys comes as `Authorization: Bearer <key>` or as
    `x-api-key: <key>` (what Anthropic clients send), on the paths that need it.

    Keys are compared in constant time (digests of equal length, hmac.compare_digest,
    against every accepted key).
    """

    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...],
                 protected: Callable[[str], bool]):
        self.app = app
        self.digests = [_digest(k.encode()) for k in api_keys]
        self.protected = protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.digests or scope["type"] != "http" or not self.protected(scope["path"]):
            return await self.app(scope, receive, send)
        given: list[bytes] = []
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                value = value.strip()
                if value[:7].lower() == b"bearer ":  # the scheme is case-insensitive
                    given.append(value[7:].strip())
                elif value:
                    given.append(b"\0")  # some other scheme: never a key
            elif name == b"x-api-key":
                given.append(value.strip())
        ok = False
        for key in given:
            digest = _digest(key)
            for d in self.digests:  # no early exit: the time does not depend on which
                ok |= hmac.compare_digest(digest, d)
        if not ok:
            message = ("missing API key: send Authorization: Bearer <key> or x-api-key: <key>"
                       if not given else "invalid API key")
            return await send_error(send, APIError(401, message, code="invalid_api_key",
                                                   headers={"WWW-Authenticate": "Bearer"}),
                                    scope.get("path", ""))
        await self.app(scope, receive, send)


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class _TooLarge(HTTPException):
    """Raised from `receive`; an HTTPException so FastAPI's body reader passes it on."""


class BodyLimit:
    """413 for a body over `max_bytes`, by Content-Length or by counting what arrives."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error = APIError(413, f"the request body is larger than {self.max_bytes} bytes",
                         code="request_too_large")
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    return await send_error(send, error, scope.get("path", ""))
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(413, error.message)
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await send_error(send, error, scope.get("path", ""))


class JsonBodies:
    """Read POST bodies as JSON whatever their Content-Type says (`curl -d` sends
    application/x-www-form-urlencoded; some clients send none)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-type"]
            given = dict(scope.get("headers", [])).get(b"content-type", b"")
            if not given.startswith(b"application/json"):
                scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


class RequestIds:
    """Every HTTP response carries `X-Request-Id`: the client's own (when it sent a short
    printable one) or a fresh one, so logs on both sides can be matched."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = b""
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                rid = value.strip()
        if not (0 < len(rid) <= 128 and all(33 <= c < 127 for c in rid)):
            rid = uuid.uuid4().hex.encode()

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0] != b"x-request-id"]
                message = {**message, "headers": headers + [(b"x-request-id", rid)]}
            await send(message)

        await self.app(scope, receive, tagged)
