"""kill -9 a multi-tenant server (a subprocess) under load, restart it on the same SQLite
database: every request a client saw complete has its usage record, with the same counts."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.tenants.conftest import ADMIN_KEY, ROOT
from yun.tenants.store import TenantStore


def _start(model: str, db: str, log: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "yun.cli", "serve", model, "--served-model-name", "tiny",
           "--port", "0", "--database", db, "--admin-key", ADMIN_KEY,
           "--kv-cache-memory", "4M", "--no-ui", "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=out, text=True, env=env)
    deadline = time.monotonic() + 180
    for line in proc.stdout:  # type: ignore[union-attr]
        m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
        if m:
            return proc, m.group(1)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"the server did not start: {log.read_text()[-2000:]}")


async def _load(url: str, key: str, stop_after: int) -> list[tuple[str, int]]:
    """32 clients sending requests until `stop_after` completed; (id, total_tokens) of each
    completed one (a 200 body, or a stream through its usage chunk and [DONE])."""
    done: list[tuple[str, int]] = []
    h = {"Authorization": f"Bearer {key}"}

    async def client(c: httpx.AsyncClient, i: int) -> None:
        body = {"model": "tiny", "messages": [{"role": "user", "content": f"Hi {i}"}],
                "max_tokens": 16 + i % 8, "ignore_eos": True}
        while len(done) < stop_after:
            try:
                if i % 2:
                    r = await c.post("/v1/chat/completions", json=body, headers=h)
                    if r.status_code == 200:
                        done.append((r.json()["id"], r.json()["usage"]["total_tokens"]))
                    continue
                stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
                rid, usage = None, None
                async with c.stream("POST", "/v1/chat/completions", json=stream,
                                    headers=h) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            event = json.loads(line[6:])
                            rid = event.get("id", rid)
                            usage = event.get("usage") or usage
                        elif line == "data: [DONE]" and usage is not None:
                            done.append((rid, usage["total_tokens"]))
            except httpx.HTTPError:
                return  # the server is gone

    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        await asyncio.gather(*(client(c, i) for i in range(32)))
    return done


def test_kill_9_mid_load_loses_no_completed_requests_record(qwen2_path, tmp_path):
    db = f"sqlite:///{tmp_path / 'tenants.db'}"
    store = TenantStore(db)
    store.create_tenant("crash")
    key, _ = store.create_key("crash")
    proc, url = _start(qwen2_path, db, tmp_path / "server1.log")
    try:
        # Let clients complete some requests, then kill -9 while others are in flight.
        async def main() -> list[tuple[str, int]]:
            loader = asyncio.create_task(_load(url, key, stop_after=10**9))
            # Kill while some request is in flight (its row still says running): the tiny
            # model finishes a request in a few ms, so a kill at a random moment can find
            # none running.
            while len(_records(store)) < 24 or not _running(store):
                await asyncio.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
            return await loader

        completed = asyncio.run(main())
    finally:
        proc.kill()
        proc.wait(10)
    assert len(completed) >= 10  # 24 records were written; responses may lag them
    proc2, url2 = _start(qwen2_path, db, tmp_path / "server2.log")
    try:
        with httpx.Client(base_url=url2, timeout=60,
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
            records = {r["request_id"]: r for r in
                       admin.get("/admin/usage", params={"since": "1d"}).json()["data"]}
        for rid, total in completed:
            assert rid in records, f"{rid} completed but has no usage record"
            assert records[rid]["status"] == "completed"
            assert records[rid]["total_tokens"] == total
        # It was killed mid-load: those requests stay "running" until the new server sees
        # the old one's heartbeat is 15 s old, then end as "interrupted".
        assert any(r["status"] in ("running", "interrupted") for r in records.values())
        with httpx.Client(base_url=url2, timeout=60) as c:  # and it serves again
            r = c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                             "max_tokens": 2})
            assert r.status_code == 200
    finally:
        proc2.send_signal(signal.SIGTERM)
        proc2.wait(30)


def _records(store: TenantStore) -> list:
    from yun.tenants import metering

    return [r for r in metering.records(store, 0) if r["status"] != "running"]


def _running(store: TenantStore) -> int:
    """Requests admitted and not finished (their rows say running)."""
    from sqlalchemy import func, select

    from yun.tenants.models import UsageRecord

    with store.sessions() as s:
        return s.scalar(select(func.count()).select_from(UsageRecord)
                        .where(UsageRecord.status == "running")) or 0
