"""The tenants layer in the HTTP server: the key check (middleware), admission of a
request against its tenant's limits, GET /v1/usage, and the admin API under /admin
(behind --admin-key). The data layer is yun/tenants; this module maps its errors to the
OpenAI error shape. Keys are never logged: errors and logs name a key by its id/prefix."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Any, Callable

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from yun.server.errors import APIError
from yun.server.middleware import send_error
from yun.tenants import metering
from yun.tenants.gate import TenantGate, UsageMeter
from yun.tenants.keys import bearer_token
from yun.tenants.limits import LimitExceeded
from yun.tenants.periods import parse_since
from yun.tenants.store import AuthError, Limits, Principal, TenantError

PRINCIPAL = "yun_principal"  # where the middleware leaves the caller, in scope["state"]
ADMIN_PREFIX = "/admin/"


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def rate_limited(e: LimitExceeded) -> APIError:
    """429 naming the limit (in the message and as `param`), with Retry-After."""
    return APIError(429, str(e), param=e.limit,
                    code="insufficient_quota" if e.is_quota else "rate_limit_exceeded",
                    headers={"Retry-After": str(e.retry_after)})


def principal_of(raw: Request) -> Principal:
    who = raw.scope.get("state", {}).get(PRINCIPAL)
    if who is None:  # the middleware guards every route that calls this
        raise unauthorized("missing API key: send Authorization: Bearer <key>")
    return who


class TenantAuth:
    """401 unless the bearer token is a live tenant key (or --api-key) on API routes, or
    the admin key on /admin routes. The caller is left in scope["state"]."""

    def __init__(self, app: ASGIApp, gate: TenantGate, protected: Callable[[str], bool]):
        self.app, self.gate, self.protected = app, gate, protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        admin = path.startswith(ADMIN_PREFIX)
        if scope["type"] != "http" or not (admin or self.protected(path)):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", []))
        token = bearer_token(headers.get(b"authorization", b""))
        if not token and b"x-api-key" in headers:  # what Anthropic clients send
            token = headers[b"x-api-key"].decode("latin-1").strip()
        if admin:
            if not self.gate.is_admin(token):
                return await send_error(send, unauthorized(
                    "the admin API needs the admin key: Authorization: Bearer <admin key>"),
                    path)
            return await self.app(scope, receive, send)
        try:
            who = await self.gate.authenticate(token)
        except AuthError as e:
            return await send_error(send, unauthorized(str(e)), path)
        scope.setdefault("state", {})[PRINCIPAL] = who
        await self.app(scope, receive, send)


async def admit(gate: TenantGate, raw: Request, request_id: str, model: str, reserved: int,
                num_jobs: int) -> UsageMeter:
    """The request's UsageMeter, or 401 / 403 / 429 in the API's error shape."""
    who = principal_of(raw)
    if who.models is not None and model not in who.models:
        raise APIError(403, f"this API key may not use the model {model!r} (it may use "
                       f"{', '.join(who.models)})", param="model", code="model_not_allowed")
    try:
        return await gate.admit(who, request_id, model, reserved, num_jobs)
    except LimitExceeded as e:
        raise rate_limited(e) from None
    except AuthError as e:
        raise unauthorized(str(e)) from None


# ---- routes --------------------------------------------------------------------------------
class TenantIn(BaseModel):
    name: str = Field(min_length=1, max_length=128)
    priority_class: str = Field("interactive", alias="class")
    limits: dict[str, int | None] = {}


class TenantPatch(BaseModel):
    priority_class: str | None = Field(None, alias="class")
    disabled: bool | None = None
    limits: dict[str, int | None] = {}


class KeyIn(BaseModel):
    tenant: str
    name: str = ""
    models: list[str] | None = None
    expires_at: float | None = None  # epoch seconds
    limits: dict[str, int | None] = {}


def _limits(given: dict[str, int | None]) -> Limits:
    unknown = set(given) - set(Limits.__dataclass_fields__)
    if unknown:
        raise APIError(400, f"unknown limit(s) {sorted(unknown)}; known: "
                       f"{sorted(Limits.__dataclass_fields__)}", param="limits")
    return Limits(**given)


def _since(value: str | None, default_days: int = 30) -> float:
    if value is None:
        return datetime.now(timezone.utc).timestamp() - default_days * 86400
    try:
        return parse_since(value)
    except ValueError as e:
        raise APIError(400, str(e).replace("--since", "since"), param="since") from None


async def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except TenantError as e:
        raise APIError(e.status, str(e)) from None


def usage_router(gate: TenantGate) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/usage")
    async def my_usage(raw: Request, since: str | None = Query(None)) -> dict[str, Any]:
        """The caller's tenant's own usage, by UTC day and model (default: 30 days)."""
        who = principal_of(raw)
        rows = await _call(metering.usage_by_day, gate.store, who.tenant_id, _since(since))
        return {"object": "list", "tenant": who.tenant, "data": rows}

    return router


def admin_router(gate: TenantGate) -> APIRouter:
    store = gate.store
    r = APIRouter(prefix="/admin")

    @r.get("/tenants")
    async def list_tenants() -> dict[str, Any]:
        return {"object": "list", "data": await _call(store.list_tenants)}

    @r.post("/tenants", status_code=201)
    async def create_tenant(body: TenantIn) -> dict[str, Any]:
        return await _call(store.create_tenant, body.name, body.priority_class,
                           _limits(body.limits))

    @r.patch("/tenants/{name}")
    async def update_tenant(name: str, body: TenantPatch) -> dict[str, Any]:
        _limits(body.limits)
        return await _call(store.update_tenant, name, disabled=body.disabled,
                           priority_class=body.priority_class, limits=body.limits)

    @r.post("/tenants/{name}/disable")
    async def disable_tenant(name: str) -> dict[str, Any]:
        return await _call(store.update_tenant, name, disabled=True)

    @r.post("/tenants/{name}/enable")
    async def enable_tenant(name: str) -> dict[str, Any]:
        return await _call(store.update_tenant, name, disabled=False)

    @r.get("/keys")
    async def list_keys(tenant: str | None = Query(None)) -> dict[str, Any]:
        return {"object": "list", "data": await _call(store.list_keys, tenant)}

    @r.post("/keys", status_code=201)
    async def create_key(body: KeyIn) -> dict[str, Any]:
        key, info = await _call(store.create_key, body.tenant, body.name, body.models,
                                body.expires_at, _limits(body.limits))
        return {**info, "key": key}  # the only time the key is shown

    @r.post("/keys/{key_id}/revoke")
    async def revoke_key(key_id: int) -> dict[str, Any]:
        return await _call(store.revoke_key, key_id)

    @r.get("/usage")
    async def usage(since: str | None = Query(None), tenant: str | None = Query(None),
                    format: str = Query("json", pattern="^(json|csv)$")) -> Response:
        rows = await _call(metering.records, store, _since(since), tenant)
        if format == "csv":
            return PlainTextResponse(metering.to_csv(rows), media_type="text/csv")
        return JSONResponse({"object": "list", "data": rows})

    return r

