"""POST /v1/chat/completions: a conversation in, a chat.completion (or its chunks) out.

Tools are rendered by the model's own chat template; its output goes through the
reasoning parser (thinking models) and the tool-call parser (yun/server/parsing.py).
`response_format`, `guided_*` and `tool_choice` "required" / a named function constrain
the output (yun/server/structured.py -> the engine's guided decoding).
"""

from __future__ import annotations

import logging
import time
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from yun.outputs import CompletionOutput, RequestOutput
from yun.server.chat_pipeline import ChatPipeline
from yun.server.errors import APIError
from yun.server.logprobs import chat_logprobs
from yun.server.parsing import MessageParser, ParsedMessage
from yun.server.protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                 ChatCompletionRequest, ChatCompletionResponse, ChatMessageOut,
                                 ToolCall, Usage)
from yun.server.serving import ChoiceState, Job, Slot, new_id, usage
from yun.server.streams import SSE_DONE, SSEResponse, sse
from yun.server.structured import ToolPlan

log = logging.getLogger("yun.server")

Chunk = Callable[..., str]


class ChatCompletions:
    def __init__(self, pipeline: ChatPipeline):
        self.pipeline = pipeline
        self.serving = pipeline.serving
        self.tokenizer = pipeline.tokenizer

    async def __call__(self, req: ChatCompletionRequest, raw: Request) -> Response:
        arrival = time.perf_counter()
        prep = await self.pipeline.prepare(req, new_id("chatcmpl"),
                                          priority=self.serving.priority(raw))
        job, plan, new_parser = prep.job, prep.plan, prep.new_parser
        slot = await self.serving.admit(raw, [job], job.request_id)
        if req.stream:
            return SSEResponse(self._stream(req, job, arrival, slot, new_parser, plan),
                               on_close=slot.release)
        return await self.serving.respond(raw, slot, self._full(job, arrival, new_parser, plan))

    def _finish_reason(self, reason: str | None, parser: MessageParser,
                       plan: ToolPlan) -> str | None:
        return self.pipeline.finish_reason(reason, parser, plan)

    def _usage(self, out: RequestOutput, job: Job, parsers: list[MessageParser]) -> Usage:
        return self.pipeline.usage(out, job, parsers)

    # ---- the whole response --------------------------------------------------------------
    async def _full(self, job: Job, arrival: float, new_parser: Callable[[], MessageParser],
                    plan: ToolPlan) -> dict[str, Any]:
        (out,) = await self.serving.run_all([job], arrival)
        top = job.params.logprobs
        choices, parsers = [], []
        for c in out.outputs:
            lps = None
            if top is not None:
                content = await run_in_threadpool(chat_logprobs, self.tokenizer, c.token_ids,
                                                  c.logprobs or [], top)
                lps = {"content": content}
            parser = new_parser()
            parsers.append(parser)
            msg = parser.parse(c.text) if parser.active else ParsedMessage(c.text)
            message = ChatMessageOut(content=msg.content, reasoning_content=msg.reasoning_content,
                                     tool_calls=[ToolCall(**tc) for tc in msg.tool_calls] or None)
            choices.append(ChatChoice(index=c.index, message=message, logprobs=lps,
                                      finish_reason=self._finish_reason(c.finish_reason, parser,
                                                                        plan)))
        u = await run_in_threadpool(self._usage, out, job, parsers)
        resp = ChatCompletionResponse(id=job.request_id, model=self.serving.model_name,
                                      choices=choices, usage=u)
        return resp.model_dump(mode="json")

    # ---- streaming -----------------------------------------------------------------------
    async def _stream(self, req: ChatCompletionRequest, job: Job, arrival: float, slot: Slot,
                      new_parser: Callable[[], MessageParser], plan: ToolPlan
                      ) -> AsyncIterator[str]:
        """The role delta of each choice, then its deltas (reasoning_content, content,
        tool_calls), a finish chunk per choice, then (include_usage) a usage chunk and
        [DONE]. Errors after the 200 become an event."""
        created, n = int(time.time()), job.params.n
        states = [ChoiceState() for _ in range(n)]
        parsers = [new_parser() for _ in range(n)]
        def chunk(choices: list[ChatChunkChoice], final_usage: Usage | None = None) -> str:
            u = final_usage or (usage([job.total], [job]) if req.continuous_usage else None)
            return sse(ChatCompletionChunk(id=job.request_id, created=created,
                                           model=self.serving.model_name, choices=choices,
                                           usage=u).model_dump_json())

        try:
            for i in range(n):
                yield chunk([ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""})])
            async for out in self.serving.generate(job, arrival):
                for c in out.outputs:
                    for event in self._deltas(c, states[c.index], parsers[c.index],
                                              job.params.logprobs, chunk, plan):
                        yield event
            if req.include_usage and job.total is not None:
                yield chunk([], final_usage=await run_in_threadpool(self._usage, job.total,
                                                                    job, parsers))
            yield SSE_DONE
        except APIError as e:
            yield sse(e.body())
        except Exception as e:  # a bug: still end the stream with an error event
            log.exception("error while streaming a chat completion")
            yield sse(APIError(500, f"internal error: {type(e).__name__}").body())
        finally:
            slot.release()

    def _deltas(self, c: CompletionOutput, st: ChoiceState, parser: MessageParser,
                top: int | None, chunk: Chunk, plan: ToolPlan) -> list[str]:
        """Events for choice `c`'s delta (what is new since the last output)."""
        if st.finished:
            return []
        new_text = c.text
        finished = c.finish_reason is not None
        if parser.active:
            deltas = parser.feed(new_text) if new_text else []
            if finished:
                deltas += parser.finish()
        else:
            deltas = [{"content": new_text}] if new_text else []
        lps = None
        if top is not None and c.token_ids:
            lps = {"content": chat_logprobs(self.tokenizer, c.token_ids, c.logprobs or [],
                                            top)}
        if lps and not deltas:
            deltas = [{"content": ""}]
        events = [chunk([ChatChunkChoice(index=c.index, delta=d, logprobs=lps if k == 0 else None)])
                  for k, d in enumerate(deltas)]
        st.tokens_sent += len(c.token_ids)
        if finished:
            st.finished = True
            reason = self._finish_reason(c.finish_reason, parser, plan)
            events.append(chunk([ChatChunkChoice(index=c.index, delta={}, finish_reason=reason)]))
        return events
