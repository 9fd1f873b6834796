"""A scripted OpenAI-compatible endpoint for yun eval's tests: /v1/models, chat and
completions; `reply(body) -> str` writes each answer, `fail(body) -> bool` picks requests
that get HTTP 500, `delay_s` stalls every reply; every request body is logged."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

Body = dict[str, Any]


def last_user(body: Body) -> str:
    return [m for m in body["messages"] if m["role"] == "user"][-1]["content"]


def build_app(reply: Callable[[Body], str], fail: Callable[[Body], bool] = lambda b: False,
              delay_s: float = 0.0, log: list[Body] | None = None,
              model: str = "fake", in_flight: dict[str, int] | None = None) -> FastAPI:
    """`in_flight` (if given) keeps "now" and "most": requests being answered at once."""
    app = FastAPI()
    seen = log if log is not None else []
    flight = in_flight if in_flight is not None else {}
    flight.update(now=0, most=0)

    @app.get("/v1/models")
    async def models() -> Body:
        return {"object": "list", "data": [{"id": model, "object": "model"}]}

    async def handle(request: Request, chat: bool):
        body = await request.json()
        seen.append(body)
        flight["now"] += 1
        flight["most"] = max(flight["most"], flight["now"])
        try:
            if delay_s:
                await asyncio.sleep(delay_s)
        finally:
            flight["now"] -= 1
        if fail(body):
            return JSONResponse({"error": {"message": "injected failure"}}, status_code=500)
        text = reply(body)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                   "finish_reason": "stop"} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"})
        return {"id": "x", "object": "chat.completion" if chat else "text_completion",
                "model": model, "choices": [choice],
                "usage": {"prompt_tokens": 10, "completion_tokens": len(text.split()),
                          "total_tokens": 10 + len(text.split())}}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    return app
