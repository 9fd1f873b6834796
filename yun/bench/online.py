"""`yun bench serve`: an asyncio load generator that speaks the OpenAI API like any client.

Each request is a streaming `POST /v1/completions`. With the default `openai` backend
(yun, vLLM, SGLang, llama.cpp's llama-server) the prompt goes as a token-id list with
`ignore_eos: true` and `stream_options: {"include_usage": true}`, so every server gets
exactly the same work. The `transformers` backend (`transformers serve` takes text
prompts only and rejects those extras) sends the prompt decoded to text with
`--tokenizer`, and exact lengths as its own `generation_config` field (min_new_tokens =
max_new_tokens, and no EOS token: the model's defaults are not merged in).

Requests start at the times of a seeded Poisson process (`request_rate`, inf = all at
once), with at most `concurrency` in flight. We time each streamed chunk that brings
tokens: the first gives TTFT, the gaps between them give ITL, the end of the stream
gives E2E; output tokens come from the final `usage` (else one per chunk with text).
A chunk brings tokens when its text is not empty, or, for yun and vLLM, which we ask
for per-chunk usage (`continuous_usage_stats`), when its completion_tokens grew: with
random weights a token may decode to no text at all.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from yun.bench.metrics import RequestRecord, RunResult, gaps
from yun.bench.workloads import BenchRequest, Workload

BACKENDS = ("openai", "yun", "vllm", "llama.cpp", "transformers")
TEXT_BACKENDS = ("transformers",)
PER_CHUNK_USAGE_BACKENDS = ("yun", "vllm")  # stream_options.continuous_usage_stats


@dataclass(frozen=True)
class ClientOptions:
    base_url: str
    model: str | None = None  # None: the first id from /v1/models
    backend: str = "openai"
    request_rate: float = math.inf  # requests/s of a Poisson process; inf = all at once
    concurrency: int | None = None  # most requests in flight; None = no limit
    temperature: float = 0.0
    seed: int = 0  # arrival times; request i samples with seed + i when temperature > 0
    timeout: float = 3600.0  # seconds per request
    api_key: str | None = None
    tokenizer: str | None = None  # text backends: folder of the tokenizer to decode prompts
    warmup: int = 1  # untimed requests first
    progress: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be positive, got {self.request_rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")

    @property
    def api_root(self) -> str:
        """'http://host:port/v1' from either 'http://host:port' or '.../v1'."""
        root = self.base_url.rstrip("/")
        return root if root.endswith("/v1") else root + "/v1"

    @property
    def sends_text(self) -> bool:
        return self.backend in TEXT_BACKENDS


@dataclass
class _Prompter:
    """Turns a BenchRequest into a request body for this backend."""

    options: ClientOptions
    model: str
    decode: Any = None  # ids -> text, for text backends

    def body(self, req: BenchRequest, index: int) -> dict[str, Any]:
        o = self.options
        body: dict[str, Any] = {"model": self.model, "max_tokens": req.max_tokens,
                                "stream": True, "temperature": o.temperature}
        if o.sends_text:  # transformers serve: exact lengths through its generation_config
            body["prompt"] = self.decode(req.prompt_token_ids)
            body["generation_config"] = json.dumps(
                {"max_new_tokens": req.max_tokens, "min_new_tokens": req.max_tokens,
                 "do_sample": o.temperature > 0})
            return body
        stream_options = {"include_usage": True}
        if o.backend in PER_CHUNK_USAGE_BACKENDS:
            stream_options["continuous_usage_stats"] = True
        body.update(prompt=req.prompt_token_ids, ignore_eos=True, stream_options=stream_options)
        if o.temperature > 0:
            body["seed"] = o.seed + index
        return body


@dataclass
class _Stream:
    """What one streamed response carried."""

    token_times: list[float] = field(default_factory=list)  # chunks that brought tokens
    choice_times: list[float] = field(default_factory=list)  # chunks with any choice
    counted: int = 0  # completion_tokens of the last per-chunk usage
    usage: dict[str, Any] | None = None
    error: str | None = None

    def on_chunk(self, obj: dict[str, Any], now: float) -> None:
        choices = obj.get("choices") or []
        usage = obj.get("usage") or None
        tokens = (usage or {}).get("completion_tokens")
        if choices and tokens is not None:  # per-chunk usage: count tokens exactly
            if tokens > self.counted:
                self.token_times.append(now)
                self.counted = tokens
        elif any(_choice_text(c) for c in choices):
            self.token_times.append(now)
        if choices:
            self.choice_times.append(now)
        if usage:
            self.usage = usage


async def _read_stream(resp: httpx.Response, out: _Stream) -> None:
    async for line in resp.aiter_lines():
        line = line.strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            obj = json.loads(data)
        except json.JSONDecodeError:
            out.error = f"bad SSE data: {data[:200]}"
            return
        if obj.get("error"):
            err = obj["error"]
            out.error = str(err.get("message", err) if isinstance(err, dict) else err)
            return
        out.on_chunk(obj, time.perf_counter())


def _choice_text(choice: dict[str, Any]) -> str:
    if "text" in choice:
        return choice.get("text") or ""
    return (choice.get("delta") or {}).get("content") or ""


async def send_one(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                   record: RequestRecord, t0: float) -> RequestRecord:
    """Send one streaming request, filling `record` (times relative to `t0`)."""
    sent = time.perf_counter()
    record.start = sent - t0
    stream = _Stream()
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode("utf-8", "replace")
                stream.error = f"HTTP {resp.status_code}: {text[:300]}"
            else:
                await _read_stream(resp, stream)
    except (httpx.HTTPError, OSError) as e:
        stream.error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    if stream.error is None and not stream.choice_times:
        stream.error = "the response streamed no completion"
    record.error = stream.error
    if record.error is not None:
        return record
    times = stream.token_times or stream.choice_times[:1]  # tokens that decode to no text
    usage = stream.usage or {}
    record.output_tokens = int(usage.get("completion_tokens") or len(times))
    if usage.get("prompt_tokens"):
        record.prompt_tokens = int(usage["prompt_tokens"])
    record.ttft = times[0] - sent
    record.itls = gaps(times)
    record.e2e = end - sent
    return record


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Start times (s) of a seeded Poisson process; all zero when rate is inf."""
    if math.isinf(rate):
        return [0.0] * n
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def run_phase(client: httpx.AsyncClient, prompter: _Prompter,
                    requests: list[BenchRequest], concurrency: int | None,
                    system: str, workload: str) -> RunResult:
    from tqdm.auto import tqdm

    o = prompter.options
    url = o.api_root + "/completions"
    limit = asyncio.Semaphore(concurrency or len(requests) or 1)
    records = [RequestRecord(prompt_tokens=r.num_prompt_tokens) for r in requests]
    offsets = arrival_offsets(len(requests), o.request_rate, o.seed)
    bar = tqdm(total=len(requests), desc=f"{system} {workload}", unit="req",
               disable=not o.progress)
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        delay = offsets[i] - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        async with limit:
            await send_one(client, url, prompter.body(requests[i], i), records[i], t0)
        bar.update(1)

    await asyncio.gather(*(one(i) for i in range(len(requests))))
    duration = time.perf_counter() - t0
    bar.close()
    result = RunResult(system=system, workload=workload, duration=duration, records=records,
                       concurrency=concurrency,
                       request_rate=None if math.isinf(o.request_rate) else o.request_rate)
    short = sum(1 for r, q in zip(records, requests) if r.ok and r.output_tokens != q.max_tokens)
    result.extra["outputs_not_of_requested_length"] = short
    return result


async def discover_model(client: httpx.AsyncClient, api_root: str) -> str:
    resp = await client.get(api_root + "/models")
    resp.raise_for_status()
    data = resp.json().get("data") or []
    if not data:
        raise RuntimeError(f"{api_root}/models lists no model; pass --model")
    return data[0]["id"]


def _client(o: ClientOptions, width: int) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {o.api_key}"} if o.api_key else {}
    limits = httpx.Limits(max_connections=max(width, 1), max_keepalive_connections=max(width, 1))
    return httpx.AsyncClient(timeout=httpx.Timeout(o.timeout, connect=30.0), limits=limits,
                             headers=headers)


def _decoder(o: ClientOptions):
    if not o.sends_text:
        return None
    if o.tokenizer is None:
        raise ValueError(f"the {o.backend} backend sends text prompts: pass --tokenizer "
                         "(a folder with the model's tokenizer) to decode the workload's ids")
    from yun.tokenizer import Tokenizer

    tok = Tokenizer.load(o.tokenizer)
    return lambda ids: tok.decode(ids, skip_special_tokens=False)


async def run_workload_async(o: ClientOptions, workload: Workload,
                             system: str | None = None) -> list[RunResult]:
    widest = max(c or len(rs) for c, rs in workload.phases())
    width = min(o.concurrency or widest, widest)
    async with _client(o, width) as client:
        try:
            model = o.model or await discover_model(client, o.api_root)
        except (httpx.HTTPError, OSError) as e:
            raise RuntimeError(f"cannot reach {o.api_root}/models ({e}); is the server up?") from e
        prompter = _Prompter(o, model, _decoder(o))
        await _warm_up(client, prompter)
        results = []
        for concurrency, requests in workload.phases():
            c = concurrency if concurrency is not None else o.concurrency
            results.append(await run_phase(client, prompter, requests, c,
                                           system or f"{o.backend} {model}", workload.name))
        for r in results:
            r.extra.setdefault("model", model)
            r.extra.setdefault("base_url", o.base_url)
        return results


async def _warm_up(client: httpx.AsyncClient, prompter: _Prompter) -> None:
    url = prompter.options.api_root + "/completions"
    for i in range(prompter.options.warmup):
        req = BenchRequest([(7 * j + 11) % 1000 for j in range(16)], 4)
        rec = await send_one(client, url, prompter.body(req, 10**6 + i), RequestRecord(16), 0.0)
        if rec.error:
            raise RuntimeError(f"the warm-up request to {url} failed: {rec.error}")


def run_workload(o: ClientOptions, workload: Workload, system: str | None = None
                 ) -> list[RunResult]:
    """Every phase of `workload` against the server at `o.base_url`."""
    return asyncio.run(run_workload_async(o, workload, system))
