"""What the server asks of the tenants layer, as coroutines (the database work runs in
worker threads): who sends this key, may this request start (its usage record opened with
a reservation), and its real usage once it ends (written before the final response).
Knows nothing of HTTP: it raises AuthError and LimitExceeded, the server maps them."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

from prometheus_client import CollectorRegistry

from yun.tenants.limits import Ledger, LimitExceeded, Settlement
from yun.tenants.metrics import TenantMetrics
from yun.tenants.store import AuthError, Principal, TenantStore

log = logging.getLogger("yun.tenants")

HEARTBEAT_S = 5.0
DEFAULT_TENANT = "default"  # whose requests --api-key's key sends


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class TenantGate:
    def __init__(self, store: TenantStore, registry: CollectorRegistry,
                 api_keys: tuple[str, ...] = (), admin_key: str | None = None):
        self.store = store
        self.ledger = Ledger(store)
        self.metrics = TenantMetrics(registry)
        self._api = [_digest(k) for k in api_keys]  # --api-key: keys of tenant `default`
        self._admin = None if admin_key is None else _digest(admin_key)
        self._shortcut: Principal | None = None
        if api_keys:
            tid = store.ensure_tenant(DEFAULT_TENANT)
            self._shortcut = Principal(tid, DEFAULT_TENANT, None, "interactive")
        self.ledger.heartbeat()

    # ---- who -----------------------------------------------------------------------------
    def is_admin(self, token: str) -> bool:
        return self._admin is not None and hmac.compare_digest(_digest(token), self._admin)

    async def authenticate(self, token: str) -> Principal:
        """The principal of `token`: the --api-key shortcut or a tenant's key (AuthError)."""
        digest = _digest(token)
        shortcut = False
        for d in self._api:  # no early exit: the time does not depend on which key
            shortcut |= hmac.compare_digest(digest, d)
        if shortcut:
            return self._shortcut  # type: ignore[return-value]
        return await asyncio.to_thread(self.store.authenticate, token)

    # ---- requests ------------------------------------------------------------------------
    async def admit(self, who: Principal, request_id: str, model: str, reserved: int,
                    num_jobs: int) -> "UsageMeter":
        """Open the request's usage record, or raise LimitExceeded / AuthError."""
        try:
            record = await asyncio.to_thread(self.ledger.admit, who, request_id, model,
                                             reserved)
        except LimitExceeded as e:
            self.metrics.rejected.labels(tenant=who.tenant, limit=e.limit).inc()
            raise
        return UsageMeter(self, who, record, num_jobs)

    async def finish(self, who: Principal, record: int, result: Settlement) -> None:
        await asyncio.to_thread(self.ledger.finish, record, result)
        self.metrics.ended(who.tenant, result.status, result.prompt_tokens,
                           result.cached_tokens, result.completion_tokens)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Heartbeats while the server runs (and ends dead servers' requests)."""
        async def beat() -> None:
            while True:
                await asyncio.sleep(HEARTBEAT_S)
                try:
                    await asyncio.to_thread(self.ledger.heartbeat)
                except Exception:  # the database is away: try again next time
                    log.exception("tenants heartbeat failed")

        task = asyncio.create_task(beat())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await asyncio.to_thread(self.ledger.retire)


@dataclass
class _Totals:
    prompt: int = 0
    cached: int = 0
    completion: int = 0
    ttft: float | None = None


class UsageMeter:
    """One API request's usage: its jobs (prompts) add their counts as they end; the record
    is written once, when the last started job has ended. A request whose every job
    completed awaits the write (`written`) before its final response or [DONE]; one that
    was cancelled or failed is written in the background."""

    def __init__(self, gate: TenantGate, who: Principal, record: int, num_jobs: int):
        self.gate, self.who, self.record = gate, who, record
        self.expected, self.started, self.ended = num_jobs, 0, 0
        self.statuses: set[str] = set()
        self.totals = _Totals()
        self.task: asyncio.Task[None] | None = None

    def job_started(self) -> None:
        self.started += 1

    def job_ended(self, status: str, prompt: int, cached: int, completion: int,
                  ttft: float | None) -> None:
        t = self.totals
        t.prompt, t.cached, t.completion = t.prompt + prompt, t.cached + cached, \
            t.completion + completion
        if ttft is not None:
            t.ttft = ttft if t.ttft is None else min(t.ttft, ttft)
        self.statuses.add(status)
        self.ended += 1
        self._maybe_write()

    def abandon(self) -> None:
        """The response is over: jobs that never started count as cancelled."""
        if self.started < self.expected:
            self.statuses.add("cancelled")
            self.expected = self.started
        self._maybe_write()

    def _maybe_write(self) -> None:
        if self.task is not None or self.ended < self.expected:
            return
        status = next((s for s in ("failed", "cancelled") if s in self.statuses), "completed")
        t = self.totals
        result = Settlement(status, t.prompt, t.cached, t.completion, t.ttft)
        self.task = asyncio.get_running_loop().create_task(
            self.gate.finish(self.who, self.record, result))
        self.task.add_done_callback(_log_failure)

    async def written(self) -> None:
        """Wait for the record if this request's write has started (raises if it failed)."""
        if self.task is not None:
            await asyncio.shield(self.task)


def _log_failure(task: "asyncio.Task[None]") -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("could not write a usage record: %r", task.exception())
