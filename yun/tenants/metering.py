"""Reading usage records: a tenant's usage by day and model (GET /v1/usage), and the
operator's export of every record (`yun admin usage`, CSV or JSON)."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from sqlalchemy import case, func, select

from yun.tenants.models import ApiKey, Tenant, UsageRecord
from yun.tenants.store import TenantStore

EXPORT_COLUMNS = ("id", "request_id", "tenant", "key_id", "key_prefix", "model", "status",
                  "started_at", "ended_at", "ttft_s", "reserved_tokens", "prompt_tokens",
                  "cached_tokens", "completion_tokens", "total_tokens")


def usage_by_day(store: TenantStore, tenant_id: int, since: float) -> list[dict[str, Any]]:
    """Ended requests of one tenant since `since`, summed per UTC day and model."""
    r = UsageRecord
    q = (select(r.day, r.model, func.count(), func.sum(r.prompt_tokens),
                func.sum(r.cached_tokens), func.sum(r.completion_tokens),
                func.sum(case_completed()))
         .where(r.tenant_id == tenant_id, r.started_at >= since, r.status != "running")
         .group_by(r.day, r.model).order_by(r.day, r.model))
    with store.sessions.begin() as s:
        rows = s.execute(q).all()
    return [{"date": day, "model": model, "requests": int(n), "completed_requests": int(ok),
             "prompt_tokens": int(p), "cached_tokens": int(c), "completion_tokens": int(g),
             "total_tokens": int(p) + int(g)}
            for day, model, n, p, c, g, ok in rows]


def case_completed():
    return case((UsageRecord.status == "completed", 1), else_=0)


def records(store: TenantStore, since: float, tenant: str | None = None
            ) -> list[dict[str, Any]]:
    """Every record started since `since` (one tenant's if given), oldest first."""
    r = UsageRecord
    q = (select(r, Tenant.name, ApiKey.prefix).join(Tenant, Tenant.id == r.tenant_id)
         .outerjoin(ApiKey, ApiKey.id == r.key_id).where(r.started_at >= since))
    if tenant is not None:
        q = q.where(Tenant.name == tenant)
    with store.sessions.begin() as s:
        rows = s.execute(q.order_by(r.started_at, r.id)).all()
    return [{"id": rec.id, "request_id": rec.request_id, "tenant": name, "key_id": rec.key_id,
             "key_prefix": prefix, "model": rec.model, "status": rec.status,
             "started_at": rec.started_at, "ended_at": rec.ended_at, "ttft_s": rec.ttft_s,
             "reserved_tokens": rec.reserved_tokens, "prompt_tokens": rec.prompt_tokens,
             "cached_tokens": rec.cached_tokens, "completion_tokens": rec.completion_tokens,
             "total_tokens": rec.prompt_tokens + rec.completion_tokens}
            for rec, name, prefix in rows]


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=EXPORT_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return out.getvalue()


def to_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=1)
