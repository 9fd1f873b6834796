"""The data layer on a real database (SQLite and PostgreSQL): keys stored as hashes,
admin operations, and the ledger's limits, with a settable clock."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select, text

from yun.tenants.limits import INSTANCE_TTL_S, Ledger, LimitExceeded, Settlement
from yun.tenants.models import ApiKey, UsageRecord
from yun.tenants.store import AuthError, Limits, TenantError, TenantStore


def _done(prompt: int, completion: int, status: str = "completed") -> Settlement:
    return Settlement(status, prompt, 0, completion, 0.01)


def test_keys_are_stored_only_as_sha256_and_looked_up(db_url, clock):
    store = TenantStore(db_url, clock=clock)
    store.create_tenant("acme", "batch")
    key, info = store.create_key("acme", "ci", models=["tiny"])
    assert key.startswith("yun-") and len(key) > 40 and info["prefix"] == key[:12]
    with store.engine.connect() as c:
        dump = " ".join(str(v) for row in c.execute(text("SELECT * FROM yun_api_keys"))
                        for v in row)
    assert key not in dump and key[12:] not in dump  # only the hash and the short prefix
    with store.sessions.begin() as s:
        assert s.scalar(select(ApiKey.hash)) == hashlib.sha256(key.encode()).hexdigest()
    who = store.authenticate(key)
    assert (who.tenant, who.priority_class, who.priority, who.models) == \
        ("acme", "batch", 0, ("tiny",))
    with pytest.raises(AuthError, match="invalid API key"):
        store.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B"))
    assert "key" not in {k for k in store.list_keys()[0]}  # listing never shows keys


def test_revoked_expired_and_disabled_are_refused(db_url, clock):
    store = TenantStore(db_url, clock=clock)
    store.create_tenant("a")
    k1, i1 = store.create_key("a")
    k2, _ = store.create_key("a", expires_at=clock.now + 60)
    store.revoke_key(i1["id"])
    with pytest.raises(AuthError, match="revoked"):
        store.authenticate(k1)
    store.authenticate(k2)
    clock.advance(61)
    with pytest.raises(AuthError, match="expired"):
        store.authenticate(k2)
    k3, _ = store.create_key("a")
    store.update_tenant("a", disabled=True)
    with pytest.raises(AuthError, match="disabled"):
        store.authenticate(k3)
    with pytest.raises(TenantError, match="already exists"):
        store.create_tenant("a")
    with pytest.raises(TenantError, match="no tenant"):
        store.create_key("nobody")
    with pytest.raises(TenantError, match="positive integer"):
        Limits(requests_per_minute=0)


def test_requests_per_minute_is_a_sliding_window_that_survives_a_restart(db_url, clock):
    store = TenantStore(db_url, clock=clock)
    store.create_tenant("a", limits=Limits(requests_per_minute=3))
    key, _ = store.create_key("a")
    ledger = Ledger(store)
    ledger.heartbeat()
    who = store.authenticate(key)
    for i in range(3):
        ledger.finish(ledger.admit(who, f"r{i}", "m", 10), _done(5, 5))
        clock.advance(10)
    with pytest.raises(LimitExceeded) as e:
        ledger.admit(who, "r3", "m", 10)
    assert e.value.limit == "requests_per_minute" and e.value.retry_after == 30
    # A new server on the same database (a restart) sees the same window.
    store2 = TenantStore(db_url, clock=clock)
    with pytest.raises(LimitExceeded):
        Ledger(store2).admit(who, "r3", "m", 10)
    clock.advance(30)  # the first request has left the window
    Ledger(store2).admit(who, "r3", "m", 10)


def test_token_quota_reserves_then_settles_and_resets_next_day(db_url, clock):
    clock.now = 1_796_083_200.0 - 3600  # 23:00 UTC
    store = TenantStore(db_url, clock=clock)
    store.create_tenant("a", limits=Limits(tokens_per_day=100))
    ledger = Ledger(store)
    ledger.heartbeat()
    who = store.authenticate(store.create_key("a")[0])
    r1 = ledger.admit(who, "r1", "m", 80)  # reserves 80: charge 80 < 100
    r2 = ledger.admit(who, "r2", "m", 80)  # still below: admitted, charge 160
    with pytest.raises(LimitExceeded) as e:
        ledger.admit(who, "r3", "m", 1)
    assert e.value.limit == "tokens_per_day" and e.value.is_quota
    assert e.value.retry_after == 3600  # until 00:00 UTC
    ledger.finish(r1, _done(10, 10))  # settles at 20: charge 100, still at the limit
    with pytest.raises(LimitExceeded):
        ledger.admit(who, "r3", "m", 1)
    ledger.finish(r2, _done(10, 5, "cancelled"))  # charge 35
    ledger.admit(who, "r3", "m", 1)
    clock.advance(3600)
    ledger.admit(who, "r4", "m", 1000)  # a new day


def test_concurrency_counts_live_servers_and_a_dead_ones_requests_end(db_url, clock):
    store = TenantStore(db_url, clock=clock)
    store.create_tenant("a", limits=Limits(max_concurrent=2))
    who = store.authenticate(store.create_key("a")[0])
    dead, alive = Ledger(store, "dead"), Ledger(store, "alive")
    dead.heartbeat()
    alive.heartbeat()
    dead.admit(who, "r1", "m", 10)
    alive.admit(who, "r2", "m", 10)
    with pytest.raises(LimitExceeded, match="max_concurrent"):
        alive.admit(who, "r3", "m", 10)
    clock.advance(INSTANCE_TTL_S + 1)  # "dead" stopped beating
    assert alive.heartbeat() == 1  # its running request is now interrupted
    alive.admit(who, "r3", "m", 10)
    with store.sessions.begin() as s:
        statuses = dict(s.execute(select(UsageRecord.request_id, UsageRecord.status)).all())
    assert statuses == {"r1": "interrupted", "r2": "running", "r3": "running"}


def test_tokens_per_minute_under_32_threads_admits_while_below(db_url, clock):
    store = TenantStore(db_url, clock=clock)
    store.create_tenant("a", limits=Limits(tokens_per_minute=1000))
    ledger = Ledger(store)
    ledger.heartbeat()
    who = store.authenticate(store.create_key("a")[0])

    def one(i: int) -> bool:
        try:
            ledger.admit(who, f"r{i}", "m", 100)
            return True
        except LimitExceeded:
            return False

    with ThreadPoolExecutor(32) as pool:
        admitted = sum(pool.map(one, range(64)))
    assert admitted == 10  # exactly: 10 x 100 reaches 1000
