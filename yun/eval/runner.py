"""Ask every endpoint every item of every task, concurrently (a bound per endpoint), from
the answer cache where it can, and grade the replies. Code is graded in threads (the
sandbox blocks), at most one per CPU."""

from __future__ import annotations

import asyncio
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from yun.eval import scorers
from yun.eval.cache import AnswerCache, cache_key
from yun.eval.client import EndpointClient, Reply
from yun.eval.endpoints import Endpoint
from yun.eval.tasks import Item, Task


@dataclass
class ItemResult:
    task: str
    endpoint: str
    item: str
    score: float | None  # None: no score (see error)
    error: str | None
    answer: str = ""
    expected: str = ""
    latency_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached: bool = False
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunOptions:
    concurrency: int = 4  # requests in flight per endpoint
    timeout_s: float = 120.0
    retries: int = 2
    progress: bool = True


@dataclass
class RunStats:
    requests_sent: int = 0
    cache_hits: int = 0


class Evaluator:
    def __init__(self, endpoints: list[Endpoint], cache: AnswerCache, options: RunOptions,
                 judge: Endpoint | None = None):
        self.endpoints, self.cache, self.options, self.judge = endpoints, cache, options, judge
        self.stats = RunStats()
        self.clients: dict[str, EndpointClient] = {}
        self.models: dict[str, str | None] = {}
        self.model_errors: dict[str, str] = {}
        self.sandbox = asyncio.Semaphore(os.cpu_count() or 1)

    def _client(self, e: Endpoint) -> EndpointClient:
        o = self.options
        return EndpointClient(e, o.concurrency, o.timeout_s, o.retries)

    async def _resolve_models(self) -> None:
        everyone = self.endpoints + ([self.judge] if self.judge else [])
        for e in everyone:
            self.clients[e.name] = self._client(e)

        async def one(e: Endpoint) -> None:
            try:
                self.models[e.name] = await self.clients[e.name].model()
            except Exception as exc:  # noqa: BLE001 - any failure is reported per endpoint
                self.models[e.name] = None
                self.model_errors[e.name] = f"cannot list models ({type(exc).__name__}: {exc})"

        await asyncio.gather(*(one(e) for e in everyone))

    async def ask(self, e: Endpoint, item_ref: str, req: scorers.Request
                  ) -> tuple[Reply, bool]:
        """The reply to `req` from `e`: from the cache, or sent (and cached on success)."""
        identity = {**e.cache_identity(), "model": self.models[e.name]}
        key = cache_key(identity, req.path, req.body)
        hit = self.cache.get(key)
        if hit is not None:
            self.stats.cache_hits += 1
            return Reply(hit["response"], None, hit.get("latency_s") or 0.0), True
        self.stats.requests_sent += 1
        reply = await self.clients[e.name].post(req.path, req.body)
        if reply.response is not None:
            self.cache.put(key, item_ref, reply.response, reply.latency_s)
        return reply, False

    async def item(self, e: Endpoint, task: Task, item: Item) -> ItemResult:
        out = ItemResult(task.name, e.name, item.id, None, None)
        model = self.models.get(e.name)
        if model is None:
            out.error = self.model_errors.get(e.name, "no model")
            return out
        reply, out.cached = await self.ask(e, f"{task.name}/{item.id}",
                                           scorers.build_request(task, item, model))
        out.latency_s = reply.latency_s
        if reply.response is None:
            out.error = reply.error
            return out
        usage = reply.response.get("usage") or {}
        out.prompt_tokens, out.completion_tokens = (usage.get("prompt_tokens"),
                                                    usage.get("completion_tokens"))
        try:
            graded = await self._grade(task, item, reply.response)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            out.error = f"cannot score the reply: {exc}"
            return out
        out.score, out.error = graded.score, graded.error
        out.answer, out.expected, out.detail = graded.answer, graded.expected, graded.detail
        return out

    async def _grade(self, task: Task, item: Item, response: dict[str, Any]) -> scorers.Graded:
        if task.kind == "code":
            async with self.sandbox:
                return await asyncio.to_thread(scorers.grade, task, item, response)
        if task.kind == "judge":
            return await self._judge(task, item, scorers.reply_text(response))
        return scorers.grade(task, item, response)

    async def _judge(self, task: Task, item: Item, answer: str) -> scorers.Graded:
        judge = self.judge
        if judge is None:
            raise ValueError(f"task {task.name} needs a judge endpoint (--judge)")
        model = self.models.get(judge.name)
        if model is None:
            return scorers.Graded(None, answer[:80], item.reference or "",
                                  error=f"judge: {self.model_errors.get(judge.name)}")
        reply, _ = await self.ask(judge, f"judge:{task.name}/{item.id}",
                                  scorers.judge_request(task, item, answer, model))
        if reply.response is None:
            return scorers.Graded(None, answer[:80], item.reference or "",
                                  error=f"judge: {reply.error}")
        return scorers.grade_judge(item, answer, reply.response)

    async def run(self, tasks: list[Task]) -> list[ItemResult]:
        from tqdm.auto import tqdm

        await self._resolve_models()
        jobs = [(e, t, it) for t in tasks for it in t.items for e in self.endpoints]
        bar = tqdm(total=len(jobs), desc="yun eval", unit="item",
                   disable=not self.options.progress)

        async def one(e: Endpoint, t: Task, it: Item) -> ItemResult:
            result = await self.item(e, t, it)
            bar.update(1)
            return result

        try:
            return list(await asyncio.gather(*(one(*j) for j in jobs)))
        finally:
            bar.close()
            for c in self.clients.values():
                await c.close()


def evaluate(tasks: list[Task], endpoints: list[Endpoint], cache: AnswerCache,
             options: RunOptions, judge: Endpoint | None = None
             ) -> tuple[list[ItemResult], Evaluator]:
    """Every (endpoint, item) result, and the evaluator (its models and request counts)."""
    ev = Evaluator(endpoints, cache, options, judge)
    return asyncio.run(ev.run(tasks)), ev
