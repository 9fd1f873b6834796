"""Priorities end to end: under a flood of a batch tenant's requests, an interactive
tenant's request is admitted before the batch requests that were already waiting.
(Its TTFT bound is measured by scripts/tenant_priority_bench.py; this test pins the order.)"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

SEQS = 2  # engine slots: the flood keeps both busy and the rest waits
BATCH_TOKENS = 384  # each flood request holds its slot for this many decode steps (on one
# CPU, as an xdist worker has, 64 steps end before the next request is through HTTP)


@pytest.fixture(scope="module")
def small_engine(qwen2_path):
    from tests.server.conftest import _engine

    eng = _engine(qwen2_path, max_num_seqs=SEQS)
    yield eng
    eng.shutdown()


async def _first_token_at(c: httpx.AsyncClient, key: str, max_tokens: int,
                          started: list[float] | None = None) -> float:
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True}
    first = None
    async with c.stream("POST", "/v1/completions", json=body,
                        headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if first is None and line.startswith('data: {"id"') and '"text":"' in line:
                first = time.monotonic()
                if started is not None:
                    started.append(first)
    assert first is not None
    return first


def test_interactive_request_overtakes_a_waiting_batch_flood(tmp_path, small_engine,
                                                             make_tenant_server):
    ts = make_tenant_server(f"sqlite:///{tmp_path / 't.db'}", engine=small_engine)
    ts.tenant("bulk", "batch")
    ts.tenant("chat", "interactive")
    bulk, chat = ts.key("bulk"), ts.key("chat")

    async def main() -> tuple[float, list[float], float]:
        started: list[float] = []  # first-token times of the flood, as they come
        async with httpx.AsyncClient(base_url=ts.url, timeout=120) as c:
            flood = [asyncio.create_task(_first_token_at(c, bulk, BATCH_TOKENS, started))
                     for _ in range(12)]
            # Both slots busy and streaming (so the two running requests are not taken
            # for waiting ones), the rest queued. Long batch outputs keep the slots held
            # until the interactive request is in the queue.
            deadline = time.monotonic() + 60
            while small_engine.stats.num_waiting < 8 or len(started) < SEQS:
                assert time.monotonic() < deadline, (
                    f"the flood never queued: {small_engine.stats.num_waiting} waiting, "
                    f"{len(started)} streaming")
                await asyncio.sleep(0.005)
            sent = time.monotonic()
            mine = await _first_token_at(c, chat, 4)
            return sent, await asyncio.gather(*flood), mine

    sent, batch_firsts, mine = asyncio.run(main())
    waiting_then = [t for t in batch_firsts if t > sent]  # had no token when it was sent
    assert len(waiting_then) >= 8
    # At most the slot freed in the same step as its own went to a batch request.
    assert sum(t < mine for t in waiting_then) <= SEQS - 1
