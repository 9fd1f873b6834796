"""Many streams on the one engine loop, and clients that go away."""

from __future__ import annotations

import asyncio
import time

MODEL = "tiny"


def _wait_until(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _all_blocks_free(engine) -> bool:
    s = engine.stats
    return engine.num_unfinished == 0 and s.num_running == s.num_waiting == 0 and \
        s.num_free_blocks == s.num_blocks


def _counter(server, name: str) -> float:
    for line in server.http().get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_64_concurrent_streams_complete_and_usage_adds_up(server, engine):
    async def one(client, i: int) -> tuple[str, int, int, str]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {i}."}],
            max_tokens=4 + i % 5, temperature=0.8, seed=i, stream=True,
            stream_options={"include_usage": True})
        text, reason, usage = "", None, None
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                reason = choice.finish_reason or reason
            usage = chunk.usage or usage
        return text, usage.completion_tokens, usage.prompt_tokens, reason

    async def main():
        async with server.async_client() as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    assert _wait_until(lambda: _all_blocks_free(engine))
    before = (_counter(server, "yun_prompt_tokens_total"),
              _counter(server, "yun_generation_tokens_total"))
    results = asyncio.run(main())
    assert len(results) == 64
    assert all(reason in ("stop", "length") for *_, reason in results)
    assert all(1 <= n <= 4 + i % 5 for i, (_, n, _, _) in enumerate(results))
    assert _wait_until(lambda: _all_blocks_free(engine))
    completion = sum(n for _, n, _, _ in results)
    prompt = sum(p for _, _, p, _ in results)
    assert _counter(server, "yun_prompt_tokens_total") - before[0] == prompt
    assert _counter(server, "yun_generation_tokens_total") - before[1] == completion


def test_client_disconnect_mid_stream_aborts_and_frees_kv_blocks(server, engine):
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 480,
            "ignore_eos": True, "stream": True}
    assert _wait_until(lambda: _all_blocks_free(engine))
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        events = [line for line in (next(lines) for _ in range(6)) if line]
        assert len(events) == 3 and engine.num_unfinished == 1
        assert engine.stats.num_free_blocks < engine.stats.num_blocks
    # The connection is closed: the request is aborted and its blocks freed long before
    # 480 tokens could have been generated.
    start = time.monotonic()
    assert _wait_until(lambda: _all_blocks_free(engine), timeout=5)
    assert time.monotonic() - start < 1.0
    metrics = server.http().get("/metrics").text
    assert 'yun_request_finished_total{finish_reason="abort"}' in metrics


def test_client_disconnect_before_a_plain_response_aborts_too(server, engine):
    import httpx

    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 480,
            "n": 4, "ignore_eos": True}
    assert _wait_until(lambda: _all_blocks_free(engine))
    try:
        with server.http() as http:
            http.post("/v1/completions", json=body, timeout=0.5)
    except httpx.ReadTimeout:
        pass
    assert _wait_until(lambda: _all_blocks_free(engine), timeout=2)
