"""Tenants and keys: the operator's operations (create, list, disable, revoke) and the
lookup of a request's key. Each call is one transaction; errors are `TenantError`
(a ValueError) naming what is wrong."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, fields
from typing import Any, Callable

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from yun.tenants import keys
from yun.tenants.db import create_schema, make_engine, session_factory
from yun.tenants.models import LIMIT_FIELDS, PRIORITY_CLASSES, ApiKey, Tenant


class TenantError(ValueError):
    """A bad admin operation (unknown tenant, duplicate name, bad limit...)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """Limits of a tenant or a key; None = unlimited. A request must pass both its
    tenant's and its key's."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise TenantError(f"{f.name} must be a positive integer (or unset), got {v!r}")

    @classmethod
    def of(cls, row: Tenant | ApiKey) -> "Limits":
        return cls(**{name: getattr(row, name) for name in LIMIT_FIELDS})

    def as_dict(self) -> dict[str, int | None]:
        return {name: getattr(self, name) for name in LIMIT_FIELDS}


@dataclass(frozen=True)
class Principal:
    """Who sends a request: a tenant, and the key it used (None for the --api-key
    shortcut, which belongs to the tenant named "default")."""

    tenant_id: int
    tenant: str
    key_id: int | None
    priority_class: str
    models: tuple[str, ...] | None = None  # the models the key may use; None = all

    @property
    def priority(self) -> int:
        return PRIORITY_CLASSES[self.priority_class]


class AuthError(Exception):
    """The key is missing, unknown, revoked or expired, or its tenant is disabled."""


def _check_class(priority_class: str) -> None:
    if priority_class not in PRIORITY_CLASSES:
        raise TenantError(f"class must be one of {sorted(PRIORITY_CLASSES)}, got "
                          f"{priority_class!r}")


def tenant_info(t: Tenant) -> dict[str, Any]:
    return {"id": t.id, "name": t.name, "class": t.priority_class, "disabled": t.disabled,
            "created_at": t.created_at, "limits": Limits.of(t).as_dict()}


def key_info(k: ApiKey, tenant: str) -> dict[str, Any]:
    return {"id": k.id, "tenant": tenant, "name": k.name, "prefix": k.prefix,
            "models": json.loads(k.models) if k.models else None,
            "expires_at": k.expires_at, "revoked": k.revoked_at is not None,
            "revoked_at": k.revoked_at, "created_at": k.created_at,
            "limits": Limits.of(k).as_dict()}


class TenantStore:
    """The tenants database (SQLite or PostgreSQL), schema created on open."""

    def __init__(self, url: str | None = None, clock: Callable[[], float] = time.time,
                 engine: Engine | None = None):
        self.engine = engine or make_engine(url)
        create_schema(self.engine)
        self.sessions: sessionmaker[Session] = session_factory(self.engine)
        self.clock = clock

    def close(self) -> None:
        self.engine.dispose()

    # ---- tenants -------------------------------------------------------------------------
    def create_tenant(self, name: str, priority_class: str = "interactive",
                      limits: Limits = Limits()) -> dict[str, Any]:
        name = name.strip()
        if not name:
            raise TenantError("a tenant needs a name")
        _check_class(priority_class)
        with self.sessions.begin() as s:
            if s.scalar(select(Tenant.id).where(Tenant.name == name)) is not None:
                raise TenantError(f"a tenant named {name!r} already exists", 409)
            t = Tenant(name=name, priority_class=priority_class, disabled=False,
                       created_at=self.clock(), **limits.as_dict())
            s.add(t)
            s.flush()
            return tenant_info(t)

    def ensure_tenant(self, name: str) -> int:
        """The id of tenant `name`, created (interactive, no limits) if missing."""
        with self.sessions.begin() as s:
            tid = s.scalar(select(Tenant.id).where(Tenant.name == name))
        if tid is not None:
            return tid
        try:
            return self.create_tenant(name)["id"]
        except TenantError:  # another server created it meanwhile
            with self.sessions.begin() as s:
                return s.scalar(select(Tenant.id).where(Tenant.name == name))

    def list_tenants(self) -> list[dict[str, Any]]:
        with self.sessions.begin() as s:
            return [tenant_info(t) for t in s.scalars(select(Tenant).order_by(Tenant.id))]

    def update_tenant(self, name: str, *, disabled: bool | None = None,
                      priority_class: str | None = None,
                      limits: dict[str, int | None] | None = None) -> dict[str, Any]:
        if priority_class is not None:
            _check_class(priority_class)
        with self.sessions.begin() as s:
            t = self._tenant(s, name)
            if disabled is not None:
                t.disabled = disabled
            if priority_class is not None:
                t.priority_class = priority_class
            for field, value in Limits(**{**Limits.of(t).as_dict(), **(limits or {})}
                                       ).as_dict().items():
                setattr(t, field, value)
            return tenant_info(t)

    @staticmethod
    def _tenant(s: Session, name: str) -> Tenant:
        t = s.scalar(select(Tenant).where(Tenant.name == name))
        if t is None:
            raise TenantError(f"no tenant named {name!r}", 404)
        return t

    # ---- keys ----------------------------------------------------------------------------
    def create_key(self, tenant: str, name: str = "", models: list[str] | None = None,
                   expires_at: float | None = None, limits: Limits = Limits()
                   ) -> tuple[str, dict[str, Any]]:
        """(the key, shown only now; its info). Only the key's hash is stored."""
        if expires_at is not None and expires_at <= self.clock():
            raise TenantError("expires_at is in the past")
        secret = keys.new_key()
        with self.sessions.begin() as s:
            t = self._tenant(s, tenant)
            k = ApiKey(tenant_id=t.id, name=name, prefix=keys.shown_prefix(secret),
                       hash=keys.key_hash(secret),
                       models=json.dumps(sorted(set(models))) if models else None,
                       expires_at=expires_at, revoked_at=None, created_at=self.clock(),
                       **limits.as_dict())
            s.add(k)
            s.flush()
            return secret, key_info(k, t.name)

    def list_keys(self, tenant: str | None = None) -> list[dict[str, Any]]:
        with self.sessions.begin() as s:
            q = select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id)
            if tenant is not None:
                q = q.where(Tenant.id == self._tenant(s, tenant).id)
            return [key_info(k, tname) for k, tname in s.execute(q.order_by(ApiKey.id))]

    def revoke_key(self, key_id: int) -> dict[str, Any]:
        with self.sessions.begin() as s:
            k = s.get(ApiKey, key_id)
            if k is None:
                raise TenantError(f"no key with id {key_id}", 404)
            if k.revoked_at is None:
                k.revoked_at = self.clock()
            return key_info(k, s.get(Tenant, k.tenant_id).name)

    # ---- requests ------------------------------------------------------------------------
    def authenticate(self, token: str) -> Principal:
        """The principal of a tenant key; AuthError (never naming the key) otherwise."""
        if not token:
            raise AuthError("missing API key: send Authorization: Bearer <key>")
        digest = keys.key_hash(token)
        with self.sessions.begin() as s:
            row = s.execute(select(ApiKey, Tenant).join(Tenant, Tenant.id == ApiKey.tenant_id)
                            .where(ApiKey.hash == digest)).first()
            if row is None or not keys.hashes_match(row[0].hash, digest):
                raise AuthError("invalid API key")
            k, t = row
            return principal_of(k, t, self.clock())


def principal_of(k: ApiKey | None, t: Tenant, now: float) -> Principal:
    """Check that the key and tenant may send requests now (AuthError if not)."""
    if k is not None:
        if k.revoked_at is not None:
            raise AuthError("this API key was revoked")
        if k.expires_at is not None and k.expires_at <= now:
            raise AuthError("this API key has expired")
    if t.disabled:
        raise AuthError(f"the tenant {t.name!r} is disabled")
    models = tuple(json.loads(k.models)) if k is not None and k.models else None
    return Principal(t.id, t.name, None if k is None else k.id, t.priority_class, models)
