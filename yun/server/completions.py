"""POST /v1/completions: prompts in (text or token ids, one or many), text_completion out.

With `echo` the prompt comes first in the text and, with `logprobs`, in the logprobs:
one entry per prompt token (the first null), then the generated tokens, as
lm-evaluation-harness reads them. `echo` with `max_tokens: 0` scores the prompt only.
`response_format` and `guided_*` constrain the output as in chat (yun/server/structured.py).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from yun.outputs import CompletionOutput, PositionLogprobs, RequestOutput, RequestOutputKind
from yun.server.errors import APIError
from yun.server.logprobs import completion_logprobs
from yun.server.prompts import completion_prompts
from yun.server.protocol import (CompletionChoice, CompletionRequest, CompletionResponse, Usage,
                                 completion_sampling_fields)
from yun.server.serving import ChoiceState, Job, OpenAIServing, Slot, usage
from yun.server.structured import guided_from_fields
from yun.server.streams import SSE_DONE, SSEResponse, sse

log = logging.getLogger("yun.server")

# What a choice shows: text, token ids, their logprobs, finish reason.
Visible = tuple[str, list[int], list[PositionLogprobs | None], str | None]


def _prompt_only(req: CompletionRequest) -> bool:
    return bool(req.echo) and req.max_tokens == 0


def _visible(req: CompletionRequest, c: CompletionOutput) -> Visible:
    if _prompt_only(req):  # the engine generated one token that we leave out
        return "", [], [], "length" if c.finish_reason is not None else None
    return c.text, c.token_ids, list(c.logprobs or []), c.finish_reason


class Completions:
    def __init__(self, serving: OpenAIServing):
        self.serving = serving
        self.tokenizer = serving.tokenizer

    async def __call__(self, req: CompletionRequest, raw: Request) -> Response:
        arrival = time.perf_counter()
        s = self.serving
        s.check_model(req.model, task="generate")
        guided, guided_param = guided_from_fields(req)
        params = completion_sampling_fields(req).build(
            s.inputs, guided=guided, priority=s.priority(raw),
            output_kind=RequestOutputKind.DELTA)  # built once, shared by the prompts' jobs
        prompts = await run_in_threadpool(completion_prompts, self.tokenizer, req)
        for _, ids in prompts:
            s.check_prompt(ids, params, "prompt")
        grammar = None if guided is None else await s.check_guided(guided, guided_param)
        rid = f"cmpl-{uuid.uuid4().hex}"
        jobs = [Job(ids, text, params, rid if len(prompts) == 1 else f"{rid}-{i}",
                    grammar=grammar, bills_output=not _prompt_only(req))
                for i, (text, ids) in enumerate(prompts)]
        slot = await s.admit(raw, jobs, rid)
        if req.stream:
            return SSEResponse(self._stream(req, rid, jobs, arrival, slot),
                               on_close=slot.release)
        return await s.respond(raw, slot, self._full(req, rid, jobs, arrival))

    def _echo_text(self, job: Job) -> str:
        if job.prompt_text is not None:
            return job.prompt_text
        return self.tokenizer.decode(job.prompt_ids, skip_special_tokens=False)

    def _echo_logprobs(self, job: Job, out: RequestOutput) -> list[PositionLogprobs | None]:
        return list(out.prompt_logprobs or [None] * len(job.prompt_ids))

    def _usage(self, req: CompletionRequest, outputs: list[RequestOutput | None],
               jobs: list[Job]) -> Usage:
        return usage([None] * len(jobs) if _prompt_only(req) else outputs, jobs)

    # ---- the whole response ------------------------------------------------------------
    async def _full(self, req: CompletionRequest, rid: str, jobs: list[Job],
                    arrival: float) -> dict[str, Any]:
        finals = await self.serving.run_all(jobs, arrival)
        choices = await run_in_threadpool(self._choices, req, jobs, finals)
        resp = CompletionResponse(id=rid, model=self.serving.model_name, choices=choices,
                                  usage=self._usage(req, list(finals), jobs))
        return resp.model_dump(mode="json")

    def _choices(self, req: CompletionRequest, jobs: list[Job],
                 finals: list[RequestOutput]) -> list[CompletionChoice]:
        n = jobs[0].params.n
        choices = []
        for p, (job, out) in enumerate(zip(jobs, finals)):
            for c in out.outputs:
                text, ids, entries, reason = _visible(req, c)
                lps = None
                if req.logprobs is not None:
                    if req.echo:
                        ids, entries = job.prompt_ids + ids, self._echo_logprobs(job, out) + entries
                    lps = completion_logprobs(self.tokenizer, ids, entries, req.logprobs)[0]
                if req.echo:
                    text = self._echo_text(job) + text
                choices.append(CompletionChoice(index=p * n + c.index, text=text,
                                                logprobs=lps.as_dict() if lps else None,
                                                finish_reason=reason))
        return choices

    # ---- streaming ---------------------------------------------------------------------
    async def _stream(self, req: CompletionRequest, rid: str, jobs: list[Job],
                      arrival: float, slot: Slot) -> AsyncIterator[str]:
        """Text deltas per choice (choice index = prompt * n + completion), a chunk with
        each finish reason, then (include_usage) a usage chunk and [DONE]."""
        created, n = int(time.time()), jobs[0].params.n
        states = [[ChoiceState() for _ in range(n)] for _ in jobs]
        latest: list[RequestOutput | None] = [None] * len(jobs)

        def chunk(choices: list[CompletionChoice], final_usage: Usage | None = None) -> str:
            u = final_usage or (self._usage(req, latest, jobs) if req.continuous_usage else None)
            return sse(CompletionResponse(id=rid, created=created, model=self.serving.model_name,
                                          choices=choices, usage=u).model_dump_json())

        try:
            async for p, out in self.serving.stream_all(jobs, arrival):
                latest[p] = jobs[p].total
                for c in out.outputs:
                    choice = self._delta(req, jobs[p], out, c, states[p][c.index],
                                         p * n + c.index)
                    if choice is not None:
                        yield chunk([choice])
            if req.include_usage:
                yield chunk([], final_usage=self._usage(req, latest, jobs))
            yield SSE_DONE
        except APIError as e:
            yield sse(e.body())
        except Exception as e:  # a bug: still end the stream with an error event
            log.exception("error while streaming a completion")
            yield sse(APIError(500, f"internal error: {type(e).__name__}").body())
        finally:
            slot.release()

    def _delta(self, req: CompletionRequest, job: Job, out: RequestOutput, c: CompletionOutput,
               st: ChoiceState, index: int) -> CompletionChoice | None:
        """Choice `c`'s delta (the echo comes with the first)."""
        if st.finished:
            return None
        new_text, new_ids, new_entries, reason = _visible(req, c)
        if not st.started:
            st.started = True
            if req.echo:
                new_text = self._echo_text(job) + new_text
                new_ids = job.prompt_ids + new_ids
                new_entries = self._echo_logprobs(job, out) + new_entries
        lps = None
        if req.logprobs is not None and new_ids:
            built, st.text_offset = completion_logprobs(self.tokenizer, new_ids, new_entries,
                                                        req.logprobs, st.text_offset)
            lps = built.as_dict()
        st.tokens_sent += len(c.token_ids)
        st.finished = reason is not None
        if not new_text and lps is None and reason is None:
            return None
        return CompletionChoice(index=index, text=new_text, logprobs=lps, finish_reason=reason)
