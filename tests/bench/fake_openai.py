"""A minimal OpenAI-style streaming server for the load generator's tests (and, run as a
script, a stand-in for llama.cpp's llama-server).

It streams `max_tokens` tokens, `tokens_per_chunk` per SSE chunk, then a usage chunk when
`stream_options.include_usage` is asked for. Requests whose first prompt id is a
multiple of `fail_mod` get HTTP 500, so tests can count errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

MODEL = "fake-model"


def build_fake_app(model: str = MODEL, tokens_per_chunk: int = 1, fail_mod: int | None = None,
                   seen: list[dict[str, Any]] | None = None) -> FastAPI:
    app = FastAPI()
    log = seen if seen is not None else []

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model, "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        log.append(body)
        prompt, n = body["prompt"], int(body["max_tokens"])
        if fail_mod and isinstance(prompt, list) and prompt[0] % fail_mod == 0:
            return JSONResponse({"error": {"message": "injected failure"}}, status_code=500)
        usage = (body.get("stream_options") or {}).get("include_usage")
        plen = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        return StreamingResponse(_events(model, n, tokens_per_chunk, plen, usage),
                                 media_type="text/event-stream")

    return app


async def _events(model: str, n: int, per_chunk: int, prompt_len: int, usage: bool):
    sent = 0
    while sent < n:
        k = min(per_chunk, n - sent)
        sent += k
        choice = {"index": 0, "text": " tok" * k, "logprobs": None,
                  "finish_reason": "length" if sent == n else None}
        chunk = {"id": "cmpl-fake", "object": "text_completion", "model": model,
                 "choices": [choice]}
        yield f"data: {json.dumps(chunk)}\n\n"
        await asyncio.sleep(0.001)
    if usage:
        tail = {"id": "cmpl-fake", "object": "text_completion", "model": model, "choices": [],
                "usage": {"prompt_tokens": prompt_len, "completion_tokens": n,
                          "total_tokens": prompt_len + n}}
        yield f"data: {json.dumps(tail)}\n\n"
    yield "data: [DONE]\n\n"


def fake_llama_server(argv: list[str]) -> None:
    """`llama-server -m GGUF --host H --port P -np N -c C -t T`, serving the fake app."""
    import uvicorn

    p = argparse.ArgumentParser()
    p.add_argument("-m", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("-np", type=int, required=True)
    p.add_argument("-c", type=int, required=True)
    p.add_argument("-t", type=int, required=True)
    args = p.parse_args(argv)
    if not os.path.isfile(args.m):
        raise SystemExit(f"no such model file: {args.m}")
    uvicorn.run(build_fake_app(model=os.path.basename(args.m)), host=args.host, port=args.port,
                log_level="warning")
