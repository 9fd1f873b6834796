"""A live multi-tenant server over a real database (SQLite and PostgreSQL): limits under
32 concurrent clients, quota overshoot, revocation, usage records against what clients
received, the admin API, per-tenant metrics."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

MODEL = "tiny"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


async def _post(client: httpx.AsyncClient, key: str, body: dict = BODY,
                path: str = "/v1/chat/completions") -> httpx.Response:
    return await client.post(path, json=body, headers={"Authorization": f"Bearer {key}"})


def _run_clients(url: str, jobs: list, concurrency: int = 32) -> list[httpx.Response]:
    """Send every (key, body) of `jobs` from `concurrency` concurrent clients."""
    async def main() -> list[httpx.Response]:
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=120,
                                     limits=httpx.Limits(max_connections=concurrency)) as c:
            async def one(key: str, body: dict) -> httpx.Response:
                async with sem:
                    return await _post(c, key, body)
            return await asyncio.gather(*(one(k, b) for k, b in jobs))

    return asyncio.run(main())


def _peak_overlap(records: list[dict]) -> int:
    events = sorted([(r["started_at"], 1) for r in records] +
                    [(r["ended_at"], -1) for r in records], key=lambda e: (e[0], e[1]))
    peak = now = 0
    for _, d in events:
        now += d
        peak = max(peak, now)
    return peak


def test_limits_hold_exactly_under_32_concurrent_clients_of_several_tenants(tenant_server):
    ts = tenant_server
    ts.tenant("a", requests_per_minute=5)
    ts.tenant("b", requests_per_minute=9)
    ts.tenant("c", max_concurrent=3)
    ts.tenant("d")
    keys = {"a": ts.key("a"), "b": ts.key("b"), "c": ts.key("c"),
            "d": ts.key("d", limits={"requests_per_minute": 4})}  # a limit on the key
    long = {**BODY, "max_tokens": 12, "ignore_eos": True}
    jobs = [(keys[t], long if t == "c" else BODY) for _ in range(24) for t in "abcd"]
    responses = _run_clients(ts.url, jobs)
    ok = {t: 0 for t in "abcd"}
    for (key, _), r in zip(jobs, responses):
        tenant = next(t for t, k in keys.items() if k == key)
        if r.status_code == 200:
            ok[tenant] += 1
            continue
        assert r.status_code == 429, r.text
        err = r.json()["error"]
        assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
        assert err["param"] == ("max_concurrent" if tenant == "c" else "requests_per_minute")
        assert err["param"] in err["message"] and int(r.headers["Retry-After"]) >= 1
    assert (ok["a"], ok["b"], ok["d"]) == (5, 9, 4)
    c_records = ts.records("c")
    assert len(c_records) == ok["c"] >= 3 and ok["c"] < 24  # some were refused
    assert _peak_overlap(c_records) <= 3
    assert all(r["status"] == "completed" for r in ts.records())


def test_token_quota_overshoot_is_below_one_reservation(tenant_server):
    ts = tenant_server
    quota = 400
    ts.tenant("q", tokens_per_day=quota)
    key = ts.key("q")
    body = {**BODY, "max_tokens": 8, "ignore_eos": True}
    responses = _run_clients(ts.url, [(key, body)] * 64)
    used = [r.json()["usage"]["total_tokens"] for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert refused and all(r.json()["error"]["code"] == "insufficient_quota" and
                           r.json()["error"]["param"] == "tokens_per_day" for r in refused)
    reservation = max(used)  # prompt + max_tokens: ignore_eos uses all of it
    # Admitted while the charge was below the quota; each settles at its reservation.
    assert quota <= sum(used) < quota + reservation
    assert sum(r["total_tokens"] for r in ts.records("q")) == sum(used)


def test_a_revoked_key_gets_401_at_once(tenant_server):
    ts = tenant_server
    ts.tenant("r")
    key = ts.key("r")
    with ts.live.http() as http:
        h = {"Authorization": f"Bearer {key}"}
        assert http.post("/v1/chat/completions", json=BODY, headers=h).status_code == 200
        key_id = ts.admin.get("/admin/keys", params={"tenant": "r"}).json()["data"][0]["id"]
        assert ts.admin.post(f"/admin/keys/{key_id}/revoke").json()["revoked"] is True
        r = http.post("/v1/chat/completions", json=BODY, headers=h)
        assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert key not in r.text
        ts.admin.post("/admin/tenants/r/disable")
        other = ts.key("r")
        r = http.post("/v1/chat/completions", json=BODY,
                      headers={"Authorization": f"Bearer {other}"})
        assert r.status_code == 401 and "disabled" in r.json()["error"]["message"]


async def _stream_usage(c: httpx.AsyncClient, key: str, path: str, body: dict) -> dict:
    usage = None
    async with c.stream("POST", path, json={**body, "stream": True,
                                            "stream_options": {"include_usage": True}},
                        headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"usage":{' in line:
                import json

                usage = json.loads(line[6:])["usage"]
    return usage


def test_usage_records_add_up_to_the_usage_clients_received(tenant_server):
    ts = tenant_server
    ts.tenant("u1")
    ts.tenant("u2", "batch")
    k1, k2 = ts.key("u1"), ts.key("u2")
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Count to five."}],
            "max_tokens": 6, "temperature": 0.9, "seed": 1}
    comp = {"model": MODEL, "prompt": ["One", "Two two", "Three three three"],
            "max_tokens": 5, "n": 2, "seed": 2}

    async def main() -> dict[str, list[dict]]:
        got: dict[str, list[dict]] = {"u1": [], "u2": []}
        async with httpx.AsyncClient(base_url=ts.url, timeout=120) as c:
            async def plain(tenant: str, key: str, path: str, body: dict) -> None:
                r = await _post(c, key, body, path)
                assert r.status_code == 200, r.text
                got[tenant].append(r.json()["usage"])

            async def streamed(tenant: str, key: str, path: str, body: dict) -> None:
                got[tenant].append(await _stream_usage(c, key, path, body))

            tasks = []
            for i in range(4):
                for tenant, key in (("u1", k1), ("u2", k2)):
                    tasks += [plain(tenant, key, "/v1/chat/completions", chat),
                              streamed(tenant, key, "/v1/chat/completions", chat),
                              plain(tenant, key, "/v1/completions", comp),
                              streamed(tenant, key, "/v1/completions", comp)]
            await asyncio.gather(*tasks)
        return got

    got = asyncio.run(main())
    for tenant, key in (("u1", k1), ("u2", k2)):
        mine = ts.live.http().get("/v1/usage", headers={"Authorization": f"Bearer {key}"})
        assert mine.status_code == 200 and mine.json()["tenant"] == tenant
        rows = mine.json()["data"]
        assert {r["model"] for r in rows} == {MODEL}  # and only this tenant's rows
        for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
            assert sum(r[field] for r in rows) == sum(u[field] for u in got[tenant])
        assert sum(r["requests"] for r in rows) == len(got[tenant]) == 16
        records = ts.records(tenant)
        assert len(records) == 16 and all(r["status"] == "completed" for r in records)
        assert sorted(r["completion_tokens"] for r in records) == \
            sorted(u["completion_tokens"] for u in got[tenant])
    metrics = ts.live.http().get("/metrics").text
    total_u2 = sum(u["completion_tokens"] for u in got["u2"])
    assert f'yun_tenant_completion_tokens_total{{tenant="u2"}} {float(total_u2)}' in metrics
    assert 'yun_tenant_requests_total{status="completed",tenant="u1"} 16.0' in metrics


def test_a_cancelled_stream_is_recorded_with_what_was_generated(tenant_server):
    ts = tenant_server
    ts.tenant("x")
    key = ts.key("x")
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 400,
            "ignore_eos": True, "stream": True}
    with ts.live.http() as http, http.stream("POST", "/v1/completions", json=body,
                                             headers={"Authorization": f"Bearer {key}"}) as r:
        received = 0
        for line in r.iter_lines():
            received += line.startswith("data: {")
            if received == 5:
                break
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (not ts.records("x") or
                                           ts.records("x")[0]["status"] == "running"):
        time.sleep(0.05)
    (rec,) = ts.records("x")
    assert rec["status"] == "cancelled"
    assert 5 <= rec["completion_tokens"] < 400 and rec["prompt_tokens"] > 0


def test_admin_api_needs_the_admin_key_and_keys_can_be_limited_to_models(tenant_server):
    ts = tenant_server
    ts.tenant("m")
    key = ts.key("m", models=["other-model"])
    with ts.live.http() as http:
        for auth in ({}, {"Authorization": f"Bearer {key}"},
                     {"Authorization": "Bearer admin-key-0123456788"}):
            r = http.get("/admin/tenants", headers=auth)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = http.post("/v1/chat/completions", json=BODY,
                      headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 403 and r.json()["error"]["param"] == "model"
        assert http.post("/v1/chat/completions", json=BODY).status_code == 401
    r = ts.admin.post("/admin/tenants", json={"name": "m"})
    assert r.status_code == 409
    r = ts.admin.post("/admin/tenants", json={"name": "z", "limits": {"rpm": 3}})
    assert r.status_code == 400 and "unknown limit" in r.json()["error"]["message"]
    r = ts.admin.post("/admin/tenants", json={"name": "z", "class": "vip"})
    assert r.status_code == 400 and "class" in r.json()["error"]["message"]
    r = ts.admin.get("/admin/usage", params={"format": "csv", "since": "2026-01-01"})
    assert r.status_code == 200 and r.text.startswith("id,request_id,tenant,")


def test_api_key_shortcut_is_the_default_tenant(db_url, make_tenant_server):
    ts = make_tenant_server(db_url, api_key="single-tenant-key")
    with ts.live.http(headers={"Authorization": "Bearer single-tenant-key"}) as http:
        r = http.post("/v1/chat/completions", json=BODY)
        assert r.status_code == 200
        usage = http.get("/v1/usage").json()
    assert usage["tenant"] == "default"
    assert usage["data"][0]["total_tokens"] == r.json()["usage"]["total_tokens"]


def test_anthropic_and_responses_requests_are_admitted_and_metered_per_tenant(db_url,
                                                                               make_tenant_server):
    """The agent APIs go through the same gate as chat: a tenant key as `x-api-key`
    (Anthropic clients) or Bearer, a usage record per request with the usage the client
    saw, and a bad key refused in the API's own error shape."""
    import anthropic
    import openai

    ts = make_tenant_server(db_url, api_key=("shortcut-key-0001",))
    ts.tenant("agents")
    key = ts.key("agents")
    claude = anthropic.Anthropic(base_url=ts.url, api_key=key, max_retries=0)
    msg = claude.messages.create(model=MODEL, max_tokens=3,
                                 messages=[{"role": "user", "content": "Hi"}])
    oai = openai.OpenAI(base_url=ts.url + "/v1", api_key=key, max_retries=0)
    resp = oai.responses.create(model=MODEL, input="Hi", max_output_tokens=3)
    records = ts.records("agents")
    assert len(records) == 2 and all(r["status"] == "completed" for r in records)
    assert sorted(r["completion_tokens"] for r in records) == sorted(
        [msg.usage.output_tokens, resp.usage.output_tokens])
    with pytest.raises(anthropic.AuthenticationError) as bad:
        anthropic.Anthropic(base_url=ts.url, api_key="yun-not-a-key",
                            max_retries=0).messages.create(
            model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    assert bad.value.body["type"] == "error"  # Anthropic's shape, not OpenAI's
    # --api-key (repeatable) keys are tenant `default`'s
    ok = httpx.post(ts.url + "/v1/chat/completions", json=BODY,
                    headers={"x-api-key": "shortcut-key-0001"}, timeout=60)
    assert ok.status_code == 200, ok.text
    assert len(ts.records("default")) == 1
