"""Admission against the limits, and settlement: the request ledger in the database.

Admitting a request is one transaction that locks its tenant's row (SELECT ... FOR UPDATE
on PostgreSQL; SQLite's BEGIN IMMEDIATE serializes every writer), counts what the tenant
and the key have in flight and in the last minute, and inserts the request's usage record
with its reservation (prompt + max_tokens x n). So limits hold exactly under any number of
concurrent clients, and across servers sharing one PostgreSQL. All state is in the
database: a restart resets nothing.

- requests_per_minute: requests started in the last 60 s (a sliding window) < the limit.
- max_concurrent: requests running on live servers < the limit.
- tokens_per_minute / tokens_per_day / tokens_per_month: the tokens charged in the window
  (real counts of finished requests, reservations of running ones) < the limit. Since a
  request is admitted while the charge is below the limit and settles at most at its
  reservation, a token limit is overshot by less than one request's reservation.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.orm import Session

from yun.tenants import periods
from yun.tenants.models import ApiKey, Instance, QuotaCounter, Tenant, UsageRecord
from yun.tenants.store import AuthError, Limits, Principal, TenantStore, principal_of

WINDOW_S = 60.0
INSTANCE_TTL_S = 15.0  # a server whose heartbeat is older is dead: its requests end
QUOTA_LIMITS = ("tokens_per_day", "tokens_per_month")


class LimitExceeded(Exception):
    """429: `limit` (a Limits field) of `subject` is reached; retry in `retry_after` s."""

    def __init__(self, limit: str, subject: str, value: int, used: int, retry_after: int):
        self.limit, self.subject, self.value = limit, subject, value
        self.used, self.retry_after = used, retry_after
        what = "tokens" if "tokens" in limit else "requests"
        window = {"requests_per_minute": "in the last minute",
                  "tokens_per_minute": "in the last minute", "max_concurrent": "running now",
                  "tokens_per_day": "today (UTC)", "tokens_per_month": "this month (UTC)"}
        super().__init__(f"{limit} limit of {subject} reached: {used} {what} {window[limit]}, "
                         f"limit {value}; retry after {retry_after} s")

    @property
    def is_quota(self) -> bool:
        return self.limit in QUOTA_LIMITS


# Tokens a usage record counts for: its reservation while running (or if its server died),
# its real count once ended.
CHARGED = case((UsageRecord.status.in_(("running", "interrupted")), UsageRecord.reserved_tokens),
               else_=UsageRecord.prompt_tokens + UsageRecord.completion_tokens)


@dataclass(frozen=True)
class Settlement:
    status: str  # completed | cancelled | failed
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_s: float | None


class Ledger:
    """Admission and settlement for one server instance."""

    def __init__(self, store: TenantStore, instance_id: str | None = None):
        self.store = store
        self.instance = instance_id or uuid.uuid4().hex
        self.clock = store.clock

    # ---- instances ---------------------------------------------------------------------
    def heartbeat(self) -> int:
        """Say this server is alive; end the running requests of dead servers (status
        "interrupted": they keep counting for their reservation). Returns how many ended."""
        now = self.clock()
        with self.store.sessions.begin() as s:
            row = s.get(Instance, self.instance)
            if row is None:
                s.add(Instance(id=self.instance, started_at=now, heartbeat_at=now))
            else:
                row.heartbeat_at = now
        with self.store.sessions.begin() as s:
            dead = list(s.scalars(select(Instance.id).where(
                Instance.heartbeat_at < now - INSTANCE_TTL_S)))
            if not dead:
                return 0
            n = s.execute(update(UsageRecord).where(UsageRecord.instance.in_(dead),
                                                    UsageRecord.status == "running")
                          .values(status="interrupted", ended_at=now)).rowcount
            s.execute(delete(Instance).where(Instance.id.in_(dead)))
            return n or 0

    def retire(self) -> None:
        """On a clean shutdown: this server is gone (its requests have ended)."""
        with self.store.sessions.begin() as s:
            s.execute(delete(Instance).where(Instance.id == self.instance))

    # ---- admission ---------------------------------------------------------------------
    def admit(self, who: Principal, request_id: str, model: str, reserved: int) -> int:
        """Insert the request's record (status running) if every limit allows it; returns
        its id. Raises LimitExceeded, or AuthError if the key or tenant was just turned off."""
        with self.store.sessions.begin() as s:
            t = s.scalar(select(Tenant).where(Tenant.id == who.tenant_id).with_for_update())
            now = self.clock()  # read under the lock: times follow the order of admissions
            k = None if who.key_id is None else s.get(ApiKey, who.key_id)
            if t is None:
                raise AuthError("the tenant no longer exists")
            principal_of(k, t, now)  # revoked or disabled since authentication: 401 now
            self._check(s, UsageRecord.tenant_id == t.id, "tenant", t.id,
                        f"tenant {t.name!r}", Limits.of(t), reserved, now)
            if k is not None:
                self._check(s, UsageRecord.key_id == k.id, "key", k.id,
                            f"key {k.prefix}...", Limits.of(k), reserved, now)
            rec = UsageRecord(request_id=request_id, tenant_id=t.id, key_id=who.key_id,
                              model=model, instance=self.instance, status="running",
                              started_at=now, day=periods.day_of(now),
                              reserved_tokens=reserved)
            s.add(rec)
            self._charge(s, t.id, None if k is None else k.id, now, reserved)
            s.flush()
            return rec.id

    def _check(self, s: Session, mine, scope: str, subject_id: int, subject: str,
               limits: Limits, reserved: int, now: float) -> None:
        if limits.max_concurrent is not None:
            running = s.scalar(select(func.count()).select_from(UsageRecord)
                               .join(Instance, Instance.id == UsageRecord.instance)
                               .where(mine, UsageRecord.status == "running",
                                      Instance.heartbeat_at >= now - INSTANCE_TTL_S))
            if running >= limits.max_concurrent:
                raise LimitExceeded("max_concurrent", subject, limits.max_concurrent,
                                    running, 1)
        if limits.requests_per_minute is not None or limits.tokens_per_minute is not None:
            self._check_window(s, mine, subject, limits, now)
        for limit, period, until in (
                ("tokens_per_day", periods.day_of(now), periods.seconds_to_next_day),
                ("tokens_per_month", periods.month_of(now), periods.seconds_to_next_month)):
            value = getattr(limits, limit)
            if value is None:
                continue
            used = s.scalar(select(QuotaCounter.tokens).where(
                QuotaCounter.scope == scope, QuotaCounter.subject_id == subject_id,
                QuotaCounter.period == period)) or 0
            if used >= value:
                raise LimitExceeded(limit, subject, value, used, until(now))

    def _check_window(self, s: Session, mine, subject: str, limits: Limits,
                      now: float) -> None:
        rows = s.execute(select(UsageRecord.started_at, CHARGED)
                         .where(mine, UsageRecord.started_at > now - WINDOW_S)
                         .order_by(UsageRecord.started_at)).all()
        rpm = limits.requests_per_minute
        if rpm is not None and len(rows) >= rpm:
            # Retry when enough of the oldest have left the window.
            wait = rows[len(rows) - rpm][0] + WINDOW_S - now
            raise LimitExceeded("requests_per_minute", subject, rpm, len(rows),
                                max(1, math.ceil(wait)))
        tpm = limits.tokens_per_minute
        if tpm is None:
            return
        used = sum(int(c) for _, c in rows)
        if used >= tpm:
            left, wait = used, WINDOW_S
            for started, charged in rows:
                left -= int(charged)
                if left < tpm:
                    wait = started + WINDOW_S - now
                    break
            raise LimitExceeded("tokens_per_minute", subject, tpm, used,
                                max(1, math.ceil(wait)))

    @staticmethod
    def _charge(s: Session, tenant_id: int, key_id: int | None, started: float,
                tokens: int) -> None:
        """Add `tokens` (may be negative) to the day and month counters of the request's
        tenant and key (the periods it started in)."""
        subjects = [("tenant", tenant_id)] + ([] if key_id is None else [("key", key_id)])
        for period in (periods.day_of(started), periods.month_of(started)):
            for scope, sid in subjects:
                row = s.scalar(select(QuotaCounter).where(
                    QuotaCounter.scope == scope, QuotaCounter.subject_id == sid,
                    QuotaCounter.period == period))
                if row is None:
                    s.add(QuotaCounter(scope=scope, subject_id=sid, period=period,
                                       tokens=tokens))
                else:
                    row.tokens = row.tokens + tokens

    # ---- settlement --------------------------------------------------------------------
    def finish(self, record_id: int, result: Settlement) -> None:
        """Write the request's real counts (durably: committed before this returns) and
        give back the rest of its reservation."""
        with self.store.sessions.begin() as s:
            tenant = s.scalar(select(UsageRecord.tenant_id).where(UsageRecord.id == record_id))
            # Lock the tenant (as admission does), so a settlement never races one.
            s.scalar(select(Tenant.id).where(Tenant.id == tenant).with_for_update())
            now = self.clock()
            rec = s.scalar(select(UsageRecord).where(UsageRecord.id == record_id))
            if rec is None or rec.status != "running":
                return  # already settled (or ended by a heartbeat as interrupted)
            actual = result.prompt_tokens + result.completion_tokens
            rec.status, rec.ended_at, rec.ttft_s = result.status, now, result.ttft_s
            rec.prompt_tokens, rec.cached_tokens = result.prompt_tokens, result.cached_tokens
            rec.completion_tokens = result.completion_tokens
            self._charge(s, rec.tenant_id, rec.key_id, rec.started_at,
                         actual - rec.reserved_tokens)
